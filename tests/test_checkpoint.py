"""Checkpoint files: atomic writes, corruption detection, fallbacks and pruning."""
import os
import re
from pathlib import Path

import pytest
import torch

from score_sde.checkpoint import (CheckpointError, FolderLock, load_checkpoint, prune_snapshots,
                                  read_checkpoint, save_checkpoint, snapshots)


def _state(step):
    return {"step": step, "model": {"w": torch.arange(5.0) * step}}


def test_round_trip(tmp_path):
    save_checkpoint(_state(3), tmp_path / "c.pt")
    state = read_checkpoint(tmp_path / "c.pt")
    assert state["step"] == 3 and torch.equal(state["model"]["w"], torch.arange(5.0) * 3)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "foreign"])
def test_damaged_file_is_detected(tmp_path, damage):
    path = tmp_path / "c.pt"
    save_checkpoint(_state(1), path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "empty":
        data = bytearray()
    else:
        torch.save(_state(1), path)
        data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="c.pt"):
        read_checkpoint(path)


def test_falls_back_to_newest_good_snapshot(tmp_path, capsys):
    snaps = tmp_path / "snapshots"
    for step in (10, 20, 30):
        save_checkpoint(_state(step), snaps / f"snapshot_{step:08d}.pt")
    latest = tmp_path / "checkpoint.pt"
    save_checkpoint(_state(35), latest)
    latest.write_bytes(latest.read_bytes()[:-10])  # torn write of the latest state
    (snaps / "snapshot_00000030.pt").write_bytes(b"garbage")
    state = load_checkpoint(latest, snaps)
    assert state["step"] == 20
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "snapshot_00000030.pt" in err


@pytest.mark.parametrize("snapshots_too", [False, True])
def test_damaged_files_with_nothing_usable_stop_the_load(tmp_path, snapshots_too):
    """Starting afresh would overwrite them at the first save: the user decides."""
    snaps, latest = tmp_path / "snapshots", tmp_path / "checkpoint.pt"
    torch.save(_state(20), latest)  # a foreign file (plain torch.save) under the name
    if snapshots_too:
        for step in (10, 15):
            save_checkpoint(_state(step), snaps / f"snapshot_{step:08d}.pt")
            path = snaps / f"snapshot_{step:08d}.pt"
            path.write_bytes(path.read_bytes()[:-1])
    before = latest.read_bytes()
    problem = re.escape(f"{latest} is not a score_sde checkpoint or is truncated")
    if snapshots_too:  # all of them stand in the way of a fresh start
        message = (rf"^no usable checkpoint to resume from: {re.escape(str(latest))} and 2 more "
                   rf"damaged files \(snapshot_00000015.pt, snapshot_00000010.pt\) are left as "
                   rf"they are \(checkpoint.pt: {problem}\); move them all away to start "
                   rf"afresh, or use a new --workdir$")
    else:
        message = (rf"^no usable checkpoint to resume from: {re.escape(str(latest))} is left as "
                   rf"it is \({problem}\); move it away to start afresh, or use a new "
                   rf"--workdir$")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(latest, snaps, warn=lambda message: None)
    assert latest.read_bytes() == before


def test_unreadable_file_stops_the_load_instead_of_being_skipped(tmp_path, monkeypatch):
    """A file that cannot be read (no permission, an I/O error) may be intact: skipping it
    would let the resumed run start over and overwrite it at its next save."""
    snaps, latest = tmp_path / "snapshots", tmp_path / "checkpoint.pt"
    save_checkpoint(_state(10), snaps / "snapshot_00000010.pt")
    save_checkpoint(_state(20), latest)
    before = latest.read_bytes()
    real = Path.read_bytes

    def denied(self):
        if self.name == "checkpoint.pt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(OSError, match=r"cannot read .*checkpoint.pt \(Permission denied\); it "
                                      r"is left as it is"):
        load_checkpoint(latest, snaps)
    monkeypatch.undo()
    assert latest.read_bytes() == before
    assert load_checkpoint(latest, snaps)["step"] == 20


def test_folders_named_like_checkpoints_are_skipped(tmp_path, capsys):
    """A folder is no checkpoint file: a folder named like the newest snapshot is passed over
    (and never pruned), one named checkpoint.pt is reported and passed over."""
    snaps, latest = tmp_path / "snapshots", tmp_path / "checkpoint.pt"
    save_checkpoint(_state(10), snaps / "snapshot_00000010.pt")
    (snaps / "snapshot_00000030.pt").mkdir()
    assert [p.name for p in snapshots(snaps)] == ["snapshot_00000010.pt"]
    assert load_checkpoint(latest, snaps)["step"] == 10
    latest.mkdir()
    assert load_checkpoint(latest, snaps)["step"] == 10
    assert f"warning: skipping {latest}: a folder, not a checkpoint file" in \
        capsys.readouterr().err
    prune_snapshots(snaps, keep=0)
    assert (snaps / "snapshot_00000030.pt").is_dir()


def test_latest_preferred_when_newer_and_none_when_empty(tmp_path):
    assert load_checkpoint(tmp_path / "checkpoint.pt", tmp_path / "snapshots") is None
    save_checkpoint(_state(10), tmp_path / "snapshots" / "snapshot_00000010.pt")
    save_checkpoint(_state(15), tmp_path / "checkpoint.pt")
    assert load_checkpoint(tmp_path / "checkpoint.pt", tmp_path / "snapshots")["step"] == 15


def test_prune_keeps_newest(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(_state(step), tmp_path / f"snapshot_{step:08d}.pt")
    prune_snapshots(tmp_path, keep=2)
    assert [p.name for p in snapshots(tmp_path)] == ["snapshot_00000005.pt",
                                                      "snapshot_00000004.pt"]
    prune_snapshots(tmp_path, keep=0)  # never deletes the newest
    assert [p.name for p in snapshots(tmp_path)] == ["snapshot_00000005.pt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_folder_keeps_previous(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(_state(1), path)
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OSError):
            save_checkpoint(_state(2), path)
    finally:
        tmp_path.chmod(0o700)
    assert read_checkpoint(path)["step"] == 1


def test_failed_write_keeps_previous(tmp_path, monkeypatch):
    # A disk-full error while writing: the previous file must stay intact and no temp remains.
    path = tmp_path / "c.pt"
    save_checkpoint(_state(1), path)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(_state(2), path)
    monkeypatch.undo()
    assert read_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX file locks")
def test_folder_lock_is_exclusive_until_released(tmp_path):
    first, second = FolderLock(tmp_path / "run"), FolderLock(tmp_path / "run")
    assert first.acquire() is None  # taken (the folder is made)
    assert (tmp_path / "run" / "train.lock").read_text() == f"{os.getpid()}\n"
    assert second.acquire() == str(os.getpid())  # held: the holder's PID
    first.release()
    assert second.acquire() is None
    second.release()
    second.release()  # releasing twice is harmless
