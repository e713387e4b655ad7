"""The one capability a worker that drops root keeps: CAP_LEASE, to lease other users' files.

A read lease (``F_SETLEASE``) on a file in ``incoming/`` is how the worker knows that no one
still has it open for writing; on a file it does not own, the kernel grants one only with
CAP_LEASE. Root keeps its capabilities across setuid only when asked (PR_SET_KEEPCAPS); after
the switch, every capability but CAP_LEASE is dropped from the permitted and effective sets,
so the worker can do nothing else root could.
"""

from __future__ import annotations

import ctypes
import os

PR_SET_KEEPCAPS = 8
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
CAP_LEASE = 28
_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _Data(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def keep_across_setuid() -> None:
    """Before setuid: keep the permitted capabilities when the uids stop being 0."""
    if _libc().prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_KEEPCAPS): {os.strerror(err)}")


def only_lease() -> None:
    """After setuid: CAP_LEASE permitted and effective, nothing else, nothing inherited."""
    _set(1 << CAP_LEASE)


def pass_on_lease() -> bool:
    """Let the programs this process starts keep CAP_LEASE, and nothing else, across execve
    (a supervisor's delivery processes: they claim the files): inheritable and ambient. False
    if this process does not hold it (root keeps all it has anyway)."""
    if os.geteuid() == 0 or not _holds(CAP_LEASE):
        return False
    header = _Header(_VERSION_3, 0)
    data = (_Data * 2)()
    data[0].effective = data[0].permitted = data[0].inheritable = 1 << CAP_LEASE
    if _libc().capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset(inheritable CAP_LEASE): {os.strerror(err)}")
    if _libc().prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_LEASE, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_CAP_AMBIENT_RAISE, CAP_LEASE): {os.strerror(err)}")
    return True


def _holds(cap: int) -> bool:
    """Is ``cap`` in this process's permitted set (from /proc/self/status)?"""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("CapPrm:"):
                return bool(int(line.split()[1], 16) & (1 << cap))
    return False


def none() -> None:
    """After setuid: no capability at all (what a plain setuid without KEEPCAPS leaves)."""
    _set(0)


def _set(mask: int) -> None:
    header = _Header(_VERSION_3, 0)
    data = (_Data * 2)()
    data[0].effective = data[0].permitted = mask
    if _libc().capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset({mask:#x}): {os.strerror(err)}")
    _libc().prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0)
