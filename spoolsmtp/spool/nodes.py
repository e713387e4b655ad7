"""Nodes: the processes that claim and deliver from one spool, each in an area of its own.

A node owns an ``active/`` and a ``journal/`` folder; every other folder (incoming/, deferred/,
hold/, done/, results/, bounces/, rejected/, deadletter/) is shared by all nodes of the spool.
The node ``""`` (a worker alone: ``worker.host_id`` unset) keeps the spool's own ``active/`` and
``journal/`` (or ``spool.active``/``spool.journal``), so a spool from before nodes is one node.
A named node ``X`` works in ``<spool.path>/nodes/X/active/`` and ``<spool.path>/nodes/X/journal/``.

A node's lock (``lock``: the flocks on its two folders and the POSIX lock on ``node.lock`` in
its journal folder, see lock.py) says it is alive: the kernel, or the cluster file system,
drops it when the process or its host dies. A node whose lock is free and whose area holds
work is dead, and another node may adopt what it had in flight (app/adoption.py).

Pure but for ``present``, ``alive`` and ``has_work``, which look at the file system without
changing it.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spoolsmtp.model.config import Config, SpoolConfig
from spoolsmtp.spool import lock as spool_lock
from spoolsmtp.spool.lock import LOCK_FILE, SpoolLock

NODES = "nodes"
OWN = ("active", "journal")  # the folders a node has to itself
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class NoSuchNode(Exception):
    """No node area of that name in the spool (or not a node name at all)."""

    def __init__(self, node: str) -> None:
        super().__init__(f"no node {shown(node)!r} in this spool")
        self.node = node


class NodeAlive(Exception):
    """The node's lock is held: it is alive, and its work is its own."""

    def __init__(self, node: str) -> None:
        super().__init__(f"node {shown(node)} is alive (its lock is held); not adopted")
        self.node = node


@dataclass(frozen=True)
class Adopted:
    """What one adoption took over: envelopes in flight, retries newly scheduled."""

    node: str
    envelopes: int
    deferred: int


def superseded(journaled: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """On a spool several nodes share: has another node moved the envelope on since this
    node journaled its record (more attempts, or as many and written later)? Then the record
    on disk is newer and the journaled one must not be restored over it."""
    return _progress(current) > _progress(journaled)


def _progress(record: Mapping[str, Any]) -> tuple[int, str]:
    attempts = sum(
        int(r.get("attempts", 0))
        for tx in record.get("transactions", ())
        for r in tx.get("recipients", ())
    )
    return attempts, str(record.get("updated_at", ""))


def shown(node: str) -> str:
    """A node's name for a message (the default node has none)."""
    return node or "(default)"


def valid(node: str) -> bool:
    """A node name: "" (the default node) or letters, digits, '.', '_', '-' (at most 64)."""
    return node == "" or bool(_NAME.fullmatch(node))


def area(cfg: SpoolConfig, node: str) -> Path | None:
    """A named node's own folder (``nodes/X``); None for the default node."""
    if not valid(node):
        raise ValueError(f"not a node name: {node!r}")
    return cfg.path / NODES / node if node else None


def folder(cfg: SpoolConfig, node: str, name: str) -> Path:
    """A spool folder as node ``node`` sees it: its own active/ or journal/, else the shared."""
    root = area(cfg, node)
    return root / name if root is not None and name in OWN else cfg.folder(name)


def lock_file(cfg: SpoolConfig, node: str) -> Path:
    return folder(cfg, node, "journal") / LOCK_FILE


def lock(cfg: SpoolConfig, node: str) -> SpoolLock:
    """The node's liveness lock, not yet taken (``acquire`` never blocks: ``SpoolBusy``)."""
    return SpoolLock([folder(cfg, node, name) for name in OWN], lock_file(cfg, node))


def present(cfg: SpoolConfig) -> list[str]:
    """The nodes with an area in the spool: "" first if the default area exists, then every
    named one, sorted (an entry of ``nodes/`` that is not a folder with a node name is not)."""
    out = [""] if any(cfg.folder(name).is_dir() for name in OWN) else []
    try:
        entries = list(os.scandir(cfg.path / NODES))
    except (FileNotFoundError, NotADirectoryError):
        return out
    names = [e.name for e in entries if _NAME.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    return out + sorted(names)


def alive(cfg: SpoolConfig, node: str) -> bool:
    """Is the node's lock held by some process (on any host)? Tries without blocking and
    without taking anything a live node holds: the POSIX lock is only tested (``F_GETLK``);
    only if that is free are the folders' flocks tried, and let go at once. The caller's own
    node is not told apart: never ask this of your own node."""
    if spool_lock.alive(lock_file(cfg, node)):
        return True
    for name in OWN:
        try:
            fd = os.open(folder(cfg, node, name), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False


def has_work(cfg: SpoolConfig, node: str) -> bool:
    """Does the node's area hold anything to adopt: a file in active/ or a journal segment?"""
    try:
        with os.scandir(folder(cfg, node, "active")) as it:
            if any(not e.name.startswith(".") for e in it):
                return True
    except FileNotFoundError:
        pass
    try:
        with os.scandir(folder(cfg, node, "journal")) as it:
            return any(e.name.endswith(".log") for e in it)
    except FileNotFoundError:
        return False


def delivery_nodes(cfg: Config) -> list[str]:
    """The node names of a supervisor's delivery processes: ``<host_id or "local">.<k>``, k
    from 1 (kept across restarts, so each restart resumes its own area)."""
    base = cfg.worker.host_id or "local"
    return [f"{base}.{k}" for k in range(1, cfg.worker.processes + 1)]
