"""Which file systems count as local (the spool's quick operations then run on the loop)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spoolsmtp.model.config import SpoolConfig
from spoolsmtp.spool import fskind
from spoolsmtp.spool.folders import Spool
from tests.hostile import small_tmpfs

TABLE = "\n".join(
    [
        "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw",
        "30 22 0:26 / /var/spool rw shared:9 - nfs4 srv:/spool rw,vers=4.2",
        "31 30 0:27 / /var/spool/local\\040disk rw shared:10 - xfs /dev/vdb rw",
        "32 22 0:28 / /mnt/ceph rw shared:11 - ceph 10.0.0.1:/ rw",
        "33 22 0:29 / /mnt/ceph rw shared:12 - tmpfs tmpfs rw",
    ]
)


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/var/spool/smtp", "nfs4"),
        ("/var/spool", "nfs4"),
        ("/var/spoolx", "ext4"),  # a prefix of the name is not the mount point
        ("/var/spool/local disk/smtp", "xfs"),  # \040 is a space
        ("/mnt/ceph/a", "tmpfs"),  # mounted on top of the ceph mount
        ("/home/x", "ext4"),
    ],
)
def test_the_mount_holding_a_path_decides(path: str, kind: str) -> None:
    assert fskind.kind_in(TABLE, path) == kind


def test_network_and_unknown_file_systems_are_not_local() -> None:
    for kind in ("nfs", "nfs4", "ceph", "cifs", "smb3", "gpfs", "fuse.sshfs", "vfat", None):
        assert kind not in fskind.LOCAL


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_spool_on_a_local_disk_runs_its_quick_operations_on_the_loop(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "fs") as fs:
        assert fskind.is_local(fs)
        assert Spool(SpoolConfig(path=fs / "spool")).batch.inline
