"""app/: assembly and entry points.

The worker that drives the plan, the command line, submit, sendmail.
"""
