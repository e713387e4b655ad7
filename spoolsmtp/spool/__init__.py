"""spool/: the file-system adapters, the only code that renames.

Folders, journal, I/O batches, intake.
"""
