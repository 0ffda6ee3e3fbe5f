"""Checkpoint files that survive preemption: atomic writes, checksums, fallbacks, pruning.

A checkpoint is one dict (model, EMA, optimizer, step, config) saved with `torch.save` into a
temporary file in the target folder, flushed to disk and renamed over the target, so a kill at
any moment leaves either the old file or the new one, never a torn one. The payload is followed
by its SHA-256, so a truncated or corrupted file is detected on load; loading then falls back to
the newest good snapshot.
"""
import hashlib
import io
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch

_MAGIC = b"score_sde-checkpoint-v1\n"
_DIGEST = 32
_SNAPSHOT = re.compile(r"^snapshot_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable, truncated or fails its checksum."""


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Writes `state` to `path` atomically (temporary file, fsync, rename).

    Raises:
        OSError: the disk is full or not writable; `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(_MAGIC)
            f.write(payload)
            f.write(hashlib.sha256(payload).digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """Reads and verifies one checkpoint file (onto the CPU).

    Raises:
        CheckpointError: missing magic, truncated payload or checksum mismatch.
    """
    data = Path(path).read_bytes()
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + _DIGEST:
        raise CheckpointError(f"{path} is not a score_sde checkpoint or is truncated")
    payload, digest = data[len(_MAGIC):-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path} fails its checksum (truncated or corrupted)")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)


def snapshots(folder: Path):
    """Snapshot files in `folder`, newest (highest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _SNAPSHOT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load_checkpoint(latest: Path, snapshot_dir: Path) -> Optional[Dict[str, Any]]:
    """The newest good state: `latest`, else the newest verifiable snapshot, else None.

    Every unusable file is reported in one line on stderr and skipped.
    """
    candidates = ([Path(latest)] if Path(latest).exists() else []) + snapshots(snapshot_dir)
    best = None
    for path in candidates:
        try:
            state = read_checkpoint(path)
        except (CheckpointError, OSError, RuntimeError, EOFError) as err:
            print(f"warning: skipping unusable checkpoint {path}: {err}", file=sys.stderr)
            continue
        if best is None or state["step"] > best["step"]:
            best = state
        if path == Path(latest):
            continue
        break  # snapshots are newest first: the first good one is the best of them
    return best


def prune_snapshots(folder: Path, *, keep: int) -> None:
    """Deletes all but the `keep` newest snapshots (the newest is never deleted)."""
    for path in snapshots(folder)[max(keep, 1):]:
        path.unlink(missing_ok=True)
