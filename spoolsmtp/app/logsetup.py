"""The worker's log: to stderr, at ``log_level``, each line as text or as one JSON object
(``log_format``). A mail log line (model/maillog.py) carries its fields: as JSON they are the
object's keys, beside ``time``, ``level``, ``pid`` and ``message`` (the text line), so every
line of the log, mail log or not, is one object with the same keys for the same thing."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

from spoolsmtp.model import maillog
from spoolsmtp.model.config import LogFormat, LogLevel

TEXT_FORMAT = "%(asctime)s spoolsmtp[%(process)d] %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, pid, message, and a mail log
    line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "pid": record.process,
        }
        fields = getattr(record, maillog.EXTRA, None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out.setdefault(key, value)  # never in place of the line's own time, level, pid
        out["message"] = record.getMessage()
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def formatter(fmt: LogFormat) -> logging.Formatter:
    return JsonFormatter() if fmt is LogFormat.JSON else logging.Formatter(TEXT_FORMAT)


def configure(level: LogLevel, fmt: LogFormat, stream: TextIO | None = None) -> None:
    """The root logger's set-up for ``spoolsmtp run`` (as ``logging.basicConfig`` did)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.value.upper())
