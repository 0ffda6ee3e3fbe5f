"""Argument checks shared by the benchmark scripts: each turns a bad value into argparse's
one-line usage error (exit status 2) before any work is done."""
import math
import re
from pathlib import Path

import torch

from score_sde.cli import InputError, check_path

DEVICE_PATTERN = r"cpu|cuda(:\d+)?"


def positive_number(p, name: str, value: float) -> None:
    """A finite number > 0 (tolerances, budgets)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        p.error(f"--{name} must be a finite number > 0, got {value}")


def at_least(p, name: str, value: int, minimum: int) -> None:
    if value < minimum:
        p.error(f"--{name} must be >= {minimum}, got {value}")


def device(p, name: str, value: str, *, allow_auto: bool = False) -> None:
    """cpu, cuda or cuda:N (and auto where allowed); CUDA only where it is available."""
    pattern = f"auto|{DEVICE_PATTERN}" if allow_auto else DEVICE_PATTERN
    if not re.fullmatch(pattern, value):
        accepted = "auto, cpu, cuda or cuda:N" if allow_auto else "cpu, cuda or cuda:N"
        p.error(f"--{name} must be {accepted}, got {value!r}")
    if value.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--{name} {value} but CUDA is not available; use --{name} cpu")


def output_file(p, name: str, value) -> None:
    """A file the script may write at the end: not a folder, not under a file."""
    if value is not None:
        try:
            check_path(name, Path(value))
        except InputError as err:
            p.error(str(err))


def output_folder(p, name: str, value) -> None:
    if value is not None:
        try:
            check_path(name, Path(value), folder=True)
        except InputError as err:
            p.error(str(err))


def existing_file(p, name: str, value) -> None:
    if value is not None and not Path(value).is_file():
        what = "is a folder" if Path(value).is_dir() else "does not exist"
        p.error(f"--{name} {value} {what}; give a file")
