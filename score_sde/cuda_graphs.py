"""CUDA-graph replay of a function of tensors: score functions and ODE right-hand sides.

A diffusion sampler or likelihood solve calls the same network hundreds of times on tensors of
one shape. At moderate batch sizes each call is bound by the host launching hundreds of small
kernels, not by the GPU; a CUDA graph records those launches once and replays them with one.

`CudaGraphed(fn)` wraps any function whose arguments and results are tensors (or tuples of
tensors). Called with CUDA tensors, it records `fn` once per signature (shapes, dtypes,
devices, strides, grad mode) into a graph with static input buffers, and afterwards copies the
arguments into those buffers, replays the graph and returns copies of the static outputs.
Everything else runs `fn` as it is: CPU tensors, calls made while another graph is being
recorded, signatures beyond `max_graphs`, and any signature that cannot be recorded.

Recording never degrades the process. Before a signature is recorded, `fn` runs twice eagerly
on a side stream, the second time with PyTorch's synchronisation debug mode set to raise: a
function that reads values on the host (`.item()`, `bool()` / `float()` of a CUDA tensor),
copies pageable host memory to the device or otherwise waits for the device is found there and
runs eagerly from then on, without a recording being attempted. A recording that still fails
(for instance a non-blocking copy from pageable host memory, which only recording rejects) can
leave the device's default random number generator marked as recording in some PyTorch
versions, after which every random draw of the process raises. The wrapper then checks the
generator with a draw whose state it restores, and if needed ends a trivial recording to
release it; if even that fails it raises `RuntimeError` instead of leaving the process broken.
Failures are reported as one `CudaGraphWarning` per wrapper, or raised with `strict=True`.

What `fn` may do: any deterministic device work, including autograd inside it (the likelihood's
vector-Jacobian products are recorded too). What it must not do: depend on Python state that
changes between calls, draw random numbers (a replay repeats the recorded draws), or read
values on the host. Host-side argument checks inside `fn` run when it is recorded, not on
replays. Replays launch the same kernels as eager calls, so results equal eager calls wherever
those kernels are deterministic.
"""
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

import torch

from ._utils import host_checked_times, warn_caller

__all__ = ["CudaGraphed", "CudaGraphWarning"]

WARMUP_CALLS = 2  # eager calls on the recording stream first (cuDNN / allocator set-up)


class CudaGraphWarning(RuntimeWarning):
    """A function could not be recorded as a CUDA graph and runs eagerly instead.

    Turn it into an error with `warnings.simplefilter("error", CudaGraphWarning)` (what
    `CudaGraphed(strict=True)` does for one wrapper).
    """


class _Recording:
    __slots__ = ("graph", "inputs", "outputs", "is_tuple")

    def __init__(self, graph, inputs, outputs, is_tuple):
        self.graph, self.inputs, self.outputs, self.is_tuple = graph, inputs, outputs, is_tuple


_FAILED = object()


class CudaGraphed:
    """`fn(*tensors)` replayed from CUDA graphs, one per call signature (see module docstring).

    Args:
        fn: function of tensors returning a tensor or a tuple of tensors.
        max_graphs: signatures recorded at most; further ones run eagerly (e.g. the shrinking
            batches of per-sample step control).
        strict: raise `RuntimeError` when a signature cannot be recorded instead of warning
            and running eagerly (for benchmarks and tests that must not fall back silently).

    Attributes:
        replays: calls answered by a graph replay.
        eager_calls: calls that ran `fn` itself (including the warm-up calls of recordings).
        failures: one line per signature that could not be recorded, saying why.
    """

    def __init__(self, fn: Callable[..., Any], *, max_graphs: int = 8, strict: bool = False):
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        if not (isinstance(max_graphs, int) and not isinstance(max_graphs, bool)
                and max_graphs >= 1):
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        self.fn = fn
        # A score function that takes float64 t still does when replayed (CountingScore).
        self.takes_float64_time = getattr(fn, "takes_float64_time", False)
        self.max_graphs = max_graphs
        self.strict = bool(strict)
        self.recordings: Dict[Hashable, Any] = {}
        self.replays = 0
        self.eager_calls = 0
        self.failures: List[str] = []
        self._pool = None

    @property
    def num_graphs(self) -> int:
        """Signatures recorded successfully."""
        return sum(r is not _FAILED for r in self.recordings.values())

    def stats(self) -> Dict[str, Any]:
        """{"graphs", "replays", "eager_calls", "failures"}: what the wrapper did so far."""
        return dict(graphs=self.num_graphs, replays=self.replays, eager_calls=self.eager_calls,
                    failures=list(self.failures))

    def __call__(self, *args: torch.Tensor):
        key = self._key(args)
        if key is None:
            return self._eager(args)
        rec = self.recordings.get(key)
        if rec is None:
            if len(self.recordings) >= self.max_graphs:
                return self._eager(args)
            rec = self.recordings[key] = self._record(args)
        if rec is _FAILED:
            return self._eager(args)
        with torch.no_grad():
            for static, value in zip(rec.inputs, args):
                static.copy_(value)
        rec.graph.replay()
        self.replays += 1
        outs = tuple(o.clone() for o in rec.outputs)
        return outs if rec.is_tuple else outs[0]

    def _eager(self, args):
        self.eager_calls += 1
        return self.fn(*args)

    @staticmethod
    def _key(args) -> Optional[Tuple]:
        if not args or not all(isinstance(a, torch.Tensor) for a in args):
            return None
        if any(a.device.type != "cuda" for a in args) or torch.cuda.is_current_stream_capturing():
            return None
        return (torch.is_grad_enabled(),) + tuple(
            (tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad) for a in args)

    def _record(self, args):
        device = args[0].device
        inputs = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        caller_stream = torch.cuda.current_stream(device)
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(caller_stream)
        with torch.cuda.device(device), host_checked_times():
            with torch.cuda.stream(stream):
                # The first call may wait for the device once (lazy set-up, tables copied to
                # the device); an error here is fn's own and reaches the caller as it is.
                self.fn(*inputs)
                self.eager_calls += 1
                try:
                    with _sync_debug_errors():
                        for _ in range(WARMUP_CALLS - 1):
                            self.fn(*inputs)
                            self.eager_calls += 1
                except RuntimeError as err:
                    caller_stream.wait_stream(stream)
                    return self._failed(f"fn waits for the device ({_first_line(err)})")
            caller_stream.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    out = self.fn(*inputs)
            except Exception as err:  # noqa: BLE001 - any failure to record: run eagerly
                # A failed recording can leave the recording stream current (torch.cuda.graph
                # raises before restoring it) and the random number generator marked.
                # The half-recorded graph is freed when this block ends (the traceback holds
                # torch.cuda.graph's frame, which holds it): after the synchronisation and the
                # generator's repair, the order the GPU tests passed with.
                torch.cuda.set_stream(caller_stream)
                torch.cuda.synchronize(device)
                _restore_generator(device)
                return self._failed(f"recording failed ({_first_line(err)})")
        self._pool = graph.pool()
        is_tuple = isinstance(out, tuple)
        outputs = out if is_tuple else (out,)
        if not all(isinstance(o, torch.Tensor) for o in outputs):
            raise ValueError("fn must return a tensor or a tuple of tensors")
        return _Recording(graph, inputs, outputs, is_tuple)

    def _failed(self, reason: str):
        self.failures.append(reason)
        message = f"CUDA graph not recorded, running eagerly instead: {reason}"
        if self.strict:
            raise RuntimeError(message)
        if len(self.failures) == 1:
            warn_caller(message, CudaGraphWarning)
        return _FAILED


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class _sync_debug_errors:
    """Makes synchronising CUDA operations raise inside the block (process-wide setting)."""

    def __enter__(self):
        self.previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.previous)
        return False


def _generator_usable(device: torch.device) -> bool:
    """Whether the default generator of `device` can draw; its state is left unchanged."""
    gen = torch.cuda.default_generators[device.index]
    offset = gen.get_offset()
    try:
        torch.empty(1, device=device).normal_()
        return True
    except RuntimeError:
        return False
    finally:
        gen.set_offset(offset)


def _restore_generator(device: torch.device) -> None:
    """After a failed recording: leaves the default generator of `device` able to draw.

    Where PyTorch marks the generator as recording when a recording starts and unmarks it only
    when one ends successfully, ending a trivial recording unmarks it again.
    """
    if _generator_usable(device):
        return
    with torch.cuda.device(device):
        scratch = torch.zeros(1, device=device)
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.graph(graph, stream=stream):
            scratch.add_(1)
        del graph
    if not _generator_usable(device):
        raise RuntimeError("a failed CUDA graph recording left the default CUDA random number "
                           "generator unusable and it could not be restored; restart the "
                           "process and run without CUDA graphs")
