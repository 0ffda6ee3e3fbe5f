"""Command-line plumbing shared by the tools in `tools/`: absl flags, one-line errors and the
exit statuses 0 (done), 2 (bad input), 3 (numerical failure), 4 (a file that cannot be read or
written) and 130 (Ctrl-C)."""
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Type

from ._utils import stderr_line
from .checkpoint import CheckpointError

EXIT_BAD_INPUT = 2
EXIT_NUMERICAL = 3
# The file system failed (no permission, a full disk, an I/O error): the same command works
# once that is fixed.
EXIT_FILE_SYSTEM = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process Ctrl-C stopped


class InputError(ValueError):
    """Bad user input: exit status 2."""


def check_path(flag: str, path: Path, *, folder: bool = False) -> Path:
    """`path` as given to `--flag`, checked before any work: it is not an existing entry of
    the wrong kind (a folder where a file is written, or the reverse), and no existing
    ancestor is a file (so the folders can be created).

    Raises:
        InputError: naming the flag and the path."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind, want = ("a file", "a folder") if folder else ("a folder", "a file name")
        raise InputError(f"--{flag} {path} is {kind}; give {want}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"--{flag} {path} lies under {parent}, which is a file, not a "
                                 f"folder")
            break
    return path


def check_distinct(files: Dict[str, Optional[Path]]) -> None:
    """Refuses two flags ({flag: path or None}) naming the same file, where a later write to
    one would replace the other.

    Raises:
        InputError: naming both flags and the file."""
    named = [(flag, Path(v).resolve()) for flag, v in files.items() if v]
    for i, (flag, path) in enumerate(named):
        for other, other_path in named[i + 1:]:
            if path == other_path:
                raise InputError(f"--{flag} and --{other} are the same file {path}; give "
                                 f"each its own")


def check_not_data(outputs: Dict[str, Optional[Path]], dataset: str, *,
                   data_dir: Optional[str] = None, data_path: Optional[str] = None) -> None:
    """Refuses outputs ({flag: path or None}) that are files `dataset` is read from.

    Raises:
        InputError: naming the flag and the file."""
    from .datasets import dataset_files

    data = set(dataset_files(dataset, data_dir=data_dir, data_path=data_path))
    for flag, path in outputs.items():
        if path is not None and os.path.realpath(path) in data:
            raise InputError(f"--{flag} {path} is a file of the {dataset} data it reads; "
                             f"write it elsewhere")


def write_atomic(path: Path, write: Callable[[Path], Any]) -> Any:
    """Calls `write(tmp)` on a temporary file beside `path` (same suffix) and renames it to
    `path`, so that `path` is either the old file or the whole new one, never a torn write;
    returns what `write` returned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        result = write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def write_json(path: Path, obj: Dict[str, Any]) -> None:
    """Writes `obj` as indented JSON atomically (`write_atomic`)."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (cache keys of the tools)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _error_line(err: BaseException, prefix: str = "") -> None:
    stderr_line(f"error: {prefix}{err}")


def check_no_empty_flags(fv) -> None:
    """Raises InputError for a string flag given as "" (an unset shell variable, say), which
    would otherwise silently mean the flag's default (None or a value, not "")."""
    for name in fv:
        flag = fv[name]
        if (flag.present and isinstance(flag.value, str) and not flag.value.strip()
                and flag.default != ""):  # absl's own --log_dir means "" by default
            raise InputError(f"--{name} is empty; give a value or leave the flag out for its "
                             f"default")


def run_tool(argv: Optional[Sequence[str]], doc: str, define_flags: Callable[[Any], None],
             body: Callable[[Any], Optional[Dict[str, Any]]], *,
             numerical: Tuple[Type[BaseException], ...] = (FloatingPointError,),
             numerical_prefix: str = "", positional: Sequence[str] = ()) -> int:
    """Parses `argv` into fresh absl FlagValues defined by `define_flags`, runs
    `body(flags, *arguments)` and prints its result as one JSON line; returns the exit status.

    `positional` names the required non-flag arguments (in upper case in messages); other
    non-flag arguments are bad input.

    `--help` prints the first paragraph of `doc` and the flags. Flag errors, empty string
    flags, InputError, ValueError, FileNotFoundError and CheckpointError print one
    `error: ...` line and give 2; other OSErrors (no permission, a full disk) one line and 4;
    the `numerical` exceptions print one line (after `numerical_prefix`) and give 3; Ctrl-C
    (KeyboardInterrupt) prints one line and gives 130. Anything else propagates with its
    traceback: it is a bug, not bad input.
    """
    from absl import flags

    argv = list(sys.argv if argv is None else argv)
    fv = flags.FlagValues()
    define_flags(fv)
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        print(doc.split("\n\n")[0] + "\n\n" + fv.get_help())
        return 0
    try:
        rest = fv(argv)[1:]
        check_no_empty_flags(fv)
        if len(rest) > len(positional):
            raise InputError(f"unexpected arguments {rest[len(positional):]}")
        if len(rest) < len(positional):
            missing = " ".join(name.upper() for name in positional[len(rest):])
            raise InputError(f"missing argument {missing}")
        result = body(fv, *rest)
    except numerical as err:
        _error_line(err, numerical_prefix)
        return EXIT_NUMERICAL
    except (flags.Error, ValueError, FileNotFoundError, CheckpointError) as err:
        _error_line(err)
        return EXIT_BAD_INPUT
    except OSError as err:  # a file that cannot be read or written; the message names it
        _error_line(err)
        return EXIT_FILE_SYSTEM
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (finished work is kept)
        stderr_line("interrupted (SIGINT)")
        return EXIT_INTERRUPTED
    if result:
        print(json.dumps(result))
    return 0
