"""Checkpoint files that survive preemption: atomic writes, checksums, fallbacks, pruning.

A checkpoint is one dict (model, EMA, optimizer, step, config) saved with `torch.save` into a
temporary file in the target folder, flushed to disk and renamed over the target, so a kill at
any moment leaves either the old file or the new one, never a torn one. The payload is followed
by its SHA-256, so a truncated or corrupted file is detected on load; loading then falls back to
the newest good snapshot. A writer killed before its rename leaves a temporary file
`.NAME.tmpPID` beside the target; loading ignores such files and `remove_stale_temporaries`
deletes them.
"""
import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

try:  # POSIX; elsewhere a run folder goes without its lock
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

import torch

from ._utils import stderr_line

_MAGIC = b"score_sde-checkpoint-v1\n"
_DIGEST = 32
_SNAPSHOT = re.compile(r"^snapshot_(\d+)\.pt$")
# .NAME.tmpPID (`_temporary`), or .STEM.tmpPID.SUFFIX (`cli.write_atomic`: config.json's)
_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)(\.[A-Za-z0-9]+)?$")
_CHUNK = 1 << 24  # bytes hashed at a time by `is_intact`


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
    tmp = _temporary(path)
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


def _temporary(path: Path) -> Path:
    # The writer's process id makes the name unique and tells a stale file from one in flight.
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


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
    """Snapshot files in `folder`, newest (highest step) first (folders with a snapshot's
    name are not snapshots)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _SNAPSHOT.match(p.name)) and not p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def is_intact(path: Path) -> bool:
    """True if `path` is a complete checkpoint file whose checksum matches (read in chunks,
    not unpickled); False for a missing, truncated, corrupted or foreign file."""
    try:
        size = os.path.getsize(path)
        if size < len(_MAGIC) + _DIGEST:
            return False
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                return False
            left = size - len(_MAGIC) - _DIGEST
            while left:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    return False
                digest.update(chunk)
                left -= len(chunk)
            return f.read() == digest.digest()
    except OSError:
        return False


def _warn_stderr(message: str) -> None:
    stderr_line(message)


def load_checkpoint(latest: Path, snapshot_dir: Path, *,
                    warn: Callable[[str], None] = _warn_stderr) -> Optional[Dict[str, Any]]:
    """The newest good state: `latest`, else the newest verifiable snapshot, else None.

    Every damaged file (truncated, corrupted, foreign) is reported by one line passed to
    `warn` (default: printed on stderr) and skipped. Temporary files of interrupted writes
    are never read.

    Raises:
        OSError: a file could not be read at all (no permission, an I/O error): it may well
            be intact, and skipping it would let the next save overwrite it.
        CheckpointError: there are checkpoint files but none is usable: starting afresh would
            overwrite them, so that is left to the user.
    """
    latest = Path(latest)
    if latest.is_dir():
        warn(f"warning: skipping {latest}: a folder, not a checkpoint file")
    candidates = ([latest] if latest.exists() and not latest.is_dir() else []) + snapshots(
        snapshot_dir)
    best, damaged = None, []
    for path in candidates:
        try:
            state = read_checkpoint(path)
        except FileNotFoundError:  # removed since it was listed
            continue
        except OSError as err:
            raise OSError(f"cannot read {path} ({err.strerror or err}); it is left as it is: "
                          f"fix its permissions or the file system, then rerun") from None
        except (CheckpointError, RuntimeError, EOFError) as err:
            problem = str(err).splitlines()[0] if str(err) else type(err).__name__
            warn(f"warning: skipping unusable checkpoint {path}: {problem}")
            damaged.append((path, problem))
            continue
        if not isinstance(state, dict):
            problem = f"it holds a {type(state).__name__}, not a dict"
            warn(f"warning: skipping unusable checkpoint {path}: {problem}")
            damaged.append((path, problem))
            continue
        if best is None or state.get("step", -1) > best.get("step", -1):
            best = state
        if path == latest:
            continue
        break  # snapshots are newest first: the first good one is the best of them
    if best is None and damaged:
        (path, problem), more = damaged[0], len(damaged) - 1
        if not more:
            raise CheckpointError(
                f"no usable checkpoint to resume from: {path} is left as it is ({problem}); "
                f"move it away to start afresh, or use a new --workdir")
        raise CheckpointError(
            f"no usable checkpoint to resume from: {path} and {more} more damaged file"
            f"{'s' * (more > 1)} ({', '.join(p.name for p, _ in damaged[1:])}) are left as they "
            f"are ({path.name}: {problem}); move them all away to start afresh, or use a new "
            f"--workdir")
    return best


def prune_snapshots(folder: Path, *, keep: int) -> None:
    """Deletes all but the `keep` newest snapshots, never the newest one nor the newest intact
    one (`is_intact`): if the `keep` newest are all damaged, the newest good older one stays.

    Snapshots are checked newest first until one is intact, so normally only the newest (just
    written) is read back.
    """
    found = snapshots(folder)
    if len(found) <= max(keep, 1):
        return
    newest_good = next((p for p in found if is_intact(p)), None)
    for path in found[max(keep, 1):]:
        if path != newest_good:
            path.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> List[Path]:
    """Deletes the temporary files `.NAME.tmpPID` that writers killed before their rename
    left in `folder`, and returns their paths.

    A file whose writer is still running on this machine (another process writing into the
    same folder) is left alone. The calling process's own files count as stale: call this
    before writing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        m = _TEMPORARY.match(path.name)
        if m is None or not path.is_file():
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _process_exists(pid):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return False
    return True


class FolderLock:
    """An exclusive lock on a run folder: a `flock` on FOLDER/train.lock holding the owner's
    PID, which the system drops when the process ends, however it ends (no stale locks)."""

    FILE = "train.lock"

    def __init__(self, folder: Path):
        self.path = Path(folder) / self.FILE
        self._file = None

    def acquire(self) -> Optional[str]:
        """Takes the lock (creating the folder); returns None, or the holder's PID (as
        written in the file) when another process holds it. On a file system without locks
        (some network mounts) or without fcntl it returns None without a lock."""
        if fcntl is None:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            return holder
        except OSError:
            handle.close()
            return None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return None

    def release(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            handle.close()  # closing the file releases the flock
