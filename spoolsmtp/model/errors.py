"""The exception hierarchy: every error spoolsmtp raises on purpose, each carrying its fields.

Replies to SMTP commands are values (see ``reply``), not exceptions; exceptions are for faults
that stop a whole unit of work: a config that cannot be used, a file that is not an envelope.
"""

from __future__ import annotations


class SpoolsmtpError(Exception):
    """Root of all spoolsmtp errors."""


class ConfigError(SpoolsmtpError):
    """The configuration cannot be used; ``key`` is the dotted path of the fault."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {problem}")


class EnvelopeFault(SpoolsmtpError):
    """A file is not a usable envelope at all (binary, empty, unterminated DATA, too large)."""

    def __init__(self, source: str, line: int, problem: str) -> None:
        self.source = source
        self.line = line
        self.problem = problem
        super().__init__(f"{source}:{line}: {problem}")
