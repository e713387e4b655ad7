"""Exit codes, from sysexits.h, as the commands of SPEC.md use them."""

from __future__ import annotations

OK = 0
USAGE = 64
DATAERR = 65
NOINPUT = 66
FAILED = 67
UNAVAILABLE = 69
CANTCREAT = 73
TEMPFAIL = 75
NOPERM = 77
CONFIG = 78
