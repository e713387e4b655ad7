"""Typed spool states: the folder enum, the legal moves between folders (checked by ``Spool``
for every move), and the one reader of result records."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from spoolsmtp.model import record
from spoolsmtp.model.config import SpoolConfig
from spoolsmtp.model.record import RcptRecord, RcptStatus, Record, State, TxRecord
from spoolsmtp.model.reply import Reply
from spoolsmtp.spool.folders import FOLDERS, Spool
from spoolsmtp.spool.states import TRANSITIONS, Folder, IllegalMove, check

LEGAL = [
    ("incoming", "active"),
    ("active", "active"),
    ("active", "deferred"),
    ("active", "hold"),
    ("active", "done"),
    ("active", "rejected"),
    ("deferred", "active"),
    ("deferred", "hold"),
    ("hold", "deferred"),
]


def test_the_folders_are_the_spool_folders_and_their_names_are_strings() -> None:
    assert tuple(Folder) == FOLDERS
    assert isinstance(Folder.HOLD, str) and f"{Folder.HOLD}/x" == "hold/x"


@pytest.mark.parametrize(("source", "target"), LEGAL)
def test_every_move_the_life_of_an_envelope_has_is_legal(source: str, target: str) -> None:
    assert check(source, target) == (Folder(source), Folder(target))


def test_nothing_else_is_legal() -> None:
    legal = {(Folder(s), Folder(t)) for s, t in LEGAL}
    assert legal == TRANSITIONS
    for source in Folder:
        for target in Folder:
            if (source, target) not in legal:
                with pytest.raises(IllegalMove):
                    check(source, target)


@pytest.mark.parametrize(
    ("source", "target"),
    [("done", "active"), ("incoming", "done"), ("hold", "active"), ("results", "active")],
)
def test_an_illegal_move_names_both_folders_and_the_file(source: str, target: str) -> None:
    with pytest.raises(IllegalMove, match=rf"{source}/ID.bsmtp -> {target}/ \(a bug\)"):
        check(source, target, "ID.bsmtp")


def test_a_name_that_is_not_a_folder_is_an_illegal_move() -> None:
    with pytest.raises(IllegalMove):
        check("active", "elsewhere")


def _spool(tmp_path: Path) -> Spool:
    spool = Spool(SpoolConfig(path=tmp_path))
    spool.ensure()
    return spool


def test_spool_refuses_an_illegal_move_and_leaves_the_file_where_it_was(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    envelope = spool.envelope("done", "ID")
    envelope.write_bytes(b"x")
    with pytest.raises(IllegalMove):
        asyncio.run(spool.move("ID", "done", "active"))
    assert envelope.exists() and not spool.envelope("active", "ID").exists()


def test_spool_refuses_to_conclude_into_a_folder_an_attempt_cannot_end_in(
    tmp_path: Path,
) -> None:
    spool = _spool(tmp_path)
    spool.envelope("active", "ID").write_bytes(b"x")
    with pytest.raises(IllegalMove):
        asyncio.run(spool.conclude("ID", b"{}", "incoming"))
    assert spool.envelope("active", "ID").exists()
    assert not spool.path("results", "ID.json").exists()


def test_spool_makes_a_legal_move(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    spool.envelope("deferred", "ID").write_bytes(b"x")
    asyncio.run(spool.move("ID", Folder.DEFERRED, Folder.HOLD))
    assert spool.envelope("hold", "ID").read_bytes() == b"x"


def _record() -> Record:
    tx = TxRecord(1, "a@x", [RcptRecord("bob@example.org")])
    return Record("ID", "src", State.DONE, "t0", "t1", "done/ID.bsmtp", [tx])


def test_restore_record_puts_back_the_file(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    spool.restore_record("ID", _record().to_json())
    spool.sync_results()
    assert record.load(spool.path("results", "ID.json")) == _record()


def test_the_reader_says_none_for_a_missing_or_partial_record(tmp_path: Path) -> None:
    path = tmp_path / "ID.json"
    assert record.load(path) is None
    path.write_bytes(_record().to_json()[:20])
    assert record.load(path) is None
    path.write_bytes(b'{"id": "ID"}\n')
    assert record.load(path) is None
    path.write_bytes(_record().to_json())
    assert record.load(path) == _record()


def test_a_recipient_holds_a_status_enum_and_a_reply_and_the_json_keeps_the_same_words() -> None:
    rec = _record()
    rcpt = rec.transactions[0].recipients[0]
    rcpt.update(
        {
            "status": "failed",
            "reply": {"code": 550, "enhanced": "5.1.1", "text": "no such user\nreally"},
        }
    )
    assert rcpt.status is RcptStatus.FAILED and rcpt.final
    assert rcpt.reply == Reply(550, "5.1.1", ("no such user", "really"))
    written = json.loads(rec.to_json())["transactions"][0]["recipients"][0]
    assert written["status"] == "failed"
    assert written["reply"] == {"code": 550, "enhanced": "5.1.1", "text": "no such user\nreally"}
    assert Record.from_json(rec.to_json()) == rec


def test_a_record_with_a_field_no_recipient_has_is_not_read(tmp_path: Path) -> None:
    data = json.loads(_record().to_json())
    data["transactions"][0]["recipients"][0]["colour"] = "blue"
    path = tmp_path / "ID.json"
    path.write_text(json.dumps(data))
    assert record.load(path) is None
