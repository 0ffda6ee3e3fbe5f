"""Small shared helpers: broadcasting over data rank, argument validation, float64 time."""
import contextlib
import contextvars
import functools
import hashlib
import math
import numbers
import os
import sys
import warnings
from typing import Any, Iterable, Optional, Tuple

import torch


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Appends trailing singleton dimensions to a per-sample tensor `v` of shape [B].

    The result broadcasts against data of rank `ndim` ([B, D] vectors as well as [B, C, H, W]
    images), so no code in the package has to assume a data rank.
    """
    if v.ndim > ndim:
        raise ValueError(f"cannot broadcast a tensor of rank {v.ndim} to data of rank {ndim}")
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def warn_caller(message: str, category=UserWarning) -> None:
    """Issues a warning attributed to the first caller outside this package, so it names the
    user's line whatever the depth of library calls (and decorators) in between."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2: warn_caller's caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
            _PACKAGE_DIR + os.sep):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)


def check_batch_time(x: torch.Tensor, t: torch.Tensor, name: str = "t") -> None:
    """Raises ValueError unless `t` is a floating tensor [B] matching `x` of shape [B, ...]."""
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape [B, ...], got {got}")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape [B]={x.shape[0]}, got "
                         f"{type(t).__name__}")
    if t.shape != (x.shape[0],):
        raise ValueError(f"{name} must have shape [B]=({x.shape[0]},) to match x of shape "
                         f"{tuple(x.shape)}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_time(t: torch.Tensor, name: str = "t") -> None:
    """Raises ValueError unless `t` is a one-dimensional floating tensor [B]."""
    if not isinstance(t, torch.Tensor) or t.ndim != 1 or not t.is_floating_point():
        got = (f"dtype {t.dtype} and shape {tuple(t.shape)}" if isinstance(t, torch.Tensor)
               else type(t).__name__)
        raise ValueError(f"{name} must be a one-dimensional floating-point tensor [B], got {got}")


# Round-off allowance of time range checks (float32 resolves about 6e-8 near t = 1).
TIME_SLACK = 1e-6

# Set while a caller that validated its times on the host runs (see `host_checked_times`).
_HOST_CHECKED: contextvars.ContextVar = contextvars.ContextVar("score_sde_host_checked_times",
                                                              default=False)


@contextlib.contextmanager
def host_checked_times():
    """Marks the code inside as called by a sampler, solver or loss whose times were
    validated on the host (a grid from eps to T, times drawn in [eps, T]): there
    `check_time_range` skips accelerator tensors instead of waiting for the device."""
    token = _HOST_CHECKED.set(True)
    try:
        yield
    finally:
        _HOST_CHECKED.reset(token)


def checks_times_on_host(fn):
    """Decorator: `fn` validates its times on the host and runs under `host_checked_times`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with host_checked_times():
            return fn(*args, **kwargs)

    return wrapper


def value_checks_wanted(t: torch.Tensor) -> bool:
    """Whether checks that read the values of `t` on the host should run: always on the CPU;
    on an accelerator not inside `host_checked_times` (the library's samplers, solvers and
    losses, whose times are validated on the host once per call) nor while a CUDA graph is
    being recorded, where a host read would stall the device queue at every step or break the
    recording."""
    if t.device.type == "cpu":
        return True
    if _HOST_CHECKED.get():
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def cached_on(owner, table: torch.Tensor, device: torch.device,
              dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`table` on `device` (and in `dtype`), copied there once and kept on `owner`.

    Schedule tables live on the CPU; copying one to an accelerator at every sampler step or
    training step would make the host wait for the device each time (and cannot be recorded
    in a CUDA graph). The copy is remade when `owner`'s attribute is replaced by another
    tensor."""
    dtype = table.dtype if dtype is None else dtype
    if table.device == device and table.dtype == dtype:
        return table
    cache = owner.__dict__.setdefault("_device_tables", {})
    key = (id(table), device, dtype)
    hit = cache.get(key)
    if hit is None or hit[0] is not table:
        hit = cache[key] = (table, table.to(dtype=dtype).to(device))
    return hit[1]


def check_time_range(t: torch.Tensor, lo: float, hi: float, *, open_lo: bool = False,
                     why: str = "") -> None:
    """Raises ValueError unless every t lies in [lo, hi] (or (lo, hi] with `open_lo`), up to
    `TIME_SLACK` of round-off.

    CPU tensors are always checked. Accelerator tensors are checked with one host read of
    their minimum and maximum, except where `value_checks_wanted` says no."""
    if t.numel() == 0 or not value_checks_wanted(t):
        return
    if t.device.type == "cpu":
        t_min, t_max = float(t.detach().min()), float(t.detach().max())
    else:  # one host read for both
        t_min, t_max = torch.stack([t.detach().min(), t.detach().max()]).cpu().tolist()
    low_bad = t_min <= lo if open_lo else t_min < lo - TIME_SLACK
    if low_bad or t_max > hi + TIME_SLACK or t_min != t_min or t_max != t_max:
        bad = t_min if (low_bad or t_min != t_min) else t_max
        interval = f"({lo:g}, {hi:g}]" if open_lo else f"[{lo:g}, {hi:g}]"
        raise ValueError(f"t must lie in {interval}{why}, got {bad:g}")


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    """Raises ValueError naming the accepted values when `value` is not one of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(map(repr, choices))}")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """A finite Python number > 0 (>= 0 with `allow_zero`), not a bool. Settings are stored
    and written to JSON as given, so NumPy numbers are converted by the few callers that take
    them (`python_number`)."""
    bound = ">= 0" if allow_zero else "> 0"
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def check_int(name: str, value: int, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def python_number(value):
    """A NumPy integer or real scalar as the Python int or float it holds (np.prod of a shape
    is an np.int64); anything else unchanged, for the checks above to judge."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    return value


def check_shape(shape) -> Tuple[int, ...]:
    """Validates a sample shape [B, ...] given as a sequence of positive ints."""
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of positive ints [B, ...], got "
                         f"{shape!r}") from None
    if len(shape) < 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                 for s in shape):
        raise ValueError(f"shape must be a sequence of at least two positive ints [B, ...] "
                         f"(batch first), got {shape!r}")
    return shape


def float64_like(t: torch.Tensor) -> torch.dtype:
    """The dtype used for time and schedule arithmetic: float64 where the device supports it."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes, else `dtype`: the dtype of sums and large weights,
    which overflow float16 (65504) or lose bfloat16's few digits."""
    return torch.promote_types(dtype, torch.float32)


def tensors_sha256(*tensors: Any) -> str:
    """Hex SHA-256 of the tensors' dtypes, shapes and bytes, in order (other values skipped):
    the identity of data or weights, for resume keys and checks."""
    digest = hashlib.sha256()
    for t in tensors:
        if isinstance(t, torch.Tensor):
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def flat_sum(x: torch.Tensor) -> torch.Tensor:
    """Sums over all non-batch dimensions: [B, ...] -> [B]."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def batch_norm2(x: torch.Tensor) -> torch.Tensor:
    """Per-sample Euclidean norm over all non-batch dimensions: [B, ...] -> [B]."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)


def stderr_line(text: str) -> None:
    """Writes the first line of `text` to stderr in one write, then flushes.

    One write keeps the line whole when several processes (torchrun ranks) share the stream;
    `print` writes the text and its newline separately, so their lines could run together.
    """
    lines = str(text).splitlines()
    sys.stderr.write((lines[0] if lines else "") + "\n")
    sys.stderr.flush()


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` says that memory ran out: a device's OutOfMemoryError, or the CPU
    allocator's RuntimeError."""
    device_error = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # < 2.5
    return (isinstance(err, device_error)
            or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err)))
