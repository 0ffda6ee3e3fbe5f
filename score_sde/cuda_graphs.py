"""CUDA-graph replay of a function of tensors: score functions and ODE right-hand sides.

A diffusion sampler or likelihood solve calls the same network hundreds of times on tensors of
one shape. At moderate batch sizes each call is bound by the host launching hundreds of small
kernels, not by the GPU; a CUDA graph records those launches once and replays them with one.

`CudaGraphed(fn)` wraps any function whose arguments and results are tensors (or tuples of
tensors). Called with CUDA tensors, it records `fn` once per signature (shapes, dtypes,
devices, strides, grad mode) into a graph with static input buffers, and afterwards copies the
arguments into those buffers, replays the graph and returns copies of the static outputs.
Everything else runs `fn` as it is: CPU tensors, calls made while another graph is being
recorded, and any signature whose recording failed (an operation that cannot be recorded,
such as a host synchronisation inside `fn`; a warning names the error once).

What `fn` may do: any deterministic device work, including autograd inside it (the likelihood's
vector-Jacobian products are recorded too). What it must not do: depend on Python state that
changes between calls, draw random numbers (a replay repeats the recorded draws), or read
values on the host. Results equal eager calls up to floating-point summation order, which can
differ between recorded and eager kernels.
"""
import warnings
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import torch

__all__ = ["CudaGraphed"]

WARMUP_CALLS = 2  # eager calls on a side stream before recording (cuDNN / allocator set-up)


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

    Attributes:
        replays: calls answered by a graph replay.
        eager_calls: calls that ran `fn` itself (including the recording calls).
    """

    def __init__(self, fn: Callable[..., Any], *, max_graphs: int = 8):
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        if not (isinstance(max_graphs, int) and max_graphs >= 1):
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        self.fn = fn
        self.max_graphs = max_graphs
        self.recordings: Dict[Hashable, Any] = {}
        self.replays = 0
        self.eager_calls = 0
        self._warned = False
        self._pool = None

    @property
    def num_graphs(self) -> int:
        """Signatures recorded successfully."""
        return sum(r is not _FAILED for r in self.recordings.values())

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
        elif rec is _FAILED:
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
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    self.fn(*inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.fn(*inputs)
            self._pool = graph.pool()
        except Exception as err:  # noqa: BLE001 - any failure to record: run eagerly
            torch.cuda.synchronize(device)
            if not self._warned:
                warnings.warn(f"CUDA graph recording failed, running eagerly instead: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}",
                              RuntimeWarning, stacklevel=3)
                self._warned = True
            return _FAILED
        self.eager_calls += WARMUP_CALLS
        is_tuple = isinstance(out, tuple)
        outputs = out if is_tuple else (out,)
        if not all(isinstance(o, torch.Tensor) for o in outputs):
            raise ValueError("fn must return a tensor or a tuple of tensors")
        return _Recording(graph, inputs, outputs, is_tuple)
