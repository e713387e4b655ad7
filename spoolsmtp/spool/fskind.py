"""Whether a folder is on a local file system, from the kernel's table of mounts.

The spool's quick operations (a rename, a small file written without fsync) run on the event
loop when the spool is on a local disk, where they take microseconds; on a network or cluster
file system (NFS, CephFS, GPFS, SMB, anything FUSE), where one can take as long as the server
does, they stay in the I/O thread so that a slow server never stalls the loop (iobatch.py).
Unknown kinds count as not local.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MOUNTINFO = "/proc/self/mountinfo"
LOCAL = frozenset(
    {
        "bcachefs",
        "btrfs",
        "ext2",
        "ext3",
        "ext4",
        "f2fs",
        "jfs",
        "nilfs2",
        "overlay",
        "ramfs",
        "reiserfs",
        "tmpfs",
        "xfs",
        "zfs",
    }
)
_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """A mount point as mountinfo writes it: space, tab, newline and backslash as ``\\ooo``."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def kind_in(mountinfo: str, path: str) -> str | None:
    """The file system type of the mount holding ``path`` (absolute, links resolved) in the
    text of a mountinfo table; the last of equal mount points wins (it is mounted on top)."""
    best, kind = -1, None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if "-" not in fields or len(fields) < 5:
            continue
        point = _unescape(fields[4])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:
            best, kind = len(point), fields[fields.index("-") + 1]
    return kind


def is_local(folder: str | Path) -> bool:
    """Whether ``folder`` is on a local file system (False where that cannot be told)."""
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as fh:
            table = fh.read()
    except OSError:
        return False
    return kind_in(table, os.path.realpath(folder)) in LOCAL
