"""What a training run tells its user: console lines, a progress bar, log.txt and TensorBoard.

`Reporter` writes every line to log.txt and, unless quiet, to stderr, above a tqdm progress
bar (step / total, smoothed loss, images/s, ETA; shown only on a terminal). `SmoothedLoss`
keeps the bar's loss without reading the device at every step, and `SpeedProbe` times the
first steps of a launch for the expected duration printed at the start. `peak_memory_mib` and
`parameter_count` are figures of the log lines.
"""
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch


def parameter_count(parameters) -> str:
    """The number of elements of `parameters` for people: "4,354" or "1.23M"."""
    n = sum(p.numel() for p in parameters)
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


def format_duration(seconds: float) -> str:
    """A duration for people: "under 1 s", "45 s", "27 min", "3.2 h", "7.9 days"."""
    if seconds < 1:
        return "under 1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class SmoothedLoss:
    """Exponentially smoothed training loss for the progress bar.

    `add` only keeps the step's loss tensor (no device work, no wait for the device); `read`
    averages the finite ones kept since the last read (one transfer) and folds the mean into
    the running value with weight 1 - beta^n for n steps, so the smoothing is the same whether
    it is read every step (on the CPU) or every log_every steps (on a GPU, where a read waits
    for the device).
    """

    def __init__(self, beta: float = 0.98):
        self.beta = beta
        self.value: Optional[float] = None
        self._pending: List[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        self._pending.append(loss.detach())

    def read(self) -> Optional[float]:
        """The smoothed loss (None before any finite loss)."""
        if self._pending:
            losses = torch.stack(self._pending).double()
            finite = losses[torch.isfinite(losses)]
            n = len(self._pending)
            self._pending = []
            if finite.numel():
                mean = finite.mean().item()
                weight = self.beta ** n
                self.value = mean if self.value is None else \
                    weight * self.value + (1 - weight) * mean
        return self.value


class SpeedProbe:
    """Measures the training speed once, on the steps after a launch's first (which pays for
    warm-up and compilation): from the end of the first step until `steps` more steps are
    done or `seconds` have passed. On CUDA it waits for the device at those two moments only.
    """

    def __init__(self, device: torch.device, *, steps: int = 5, seconds: float = 20.0):
        self.device, self.steps, self.seconds = device, steps, seconds
        self._start = None  # (time, step)
        self.done = False

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def tick(self, step: int) -> Optional[float]:
        """Call after every step; returns steps per second once, when measured, else None."""
        if self.done:
            return None
        if self._start is None:
            self._start = (self._now(), step)
            return None
        t0, s0 = self._start
        if step - s0 < self.steps and time.perf_counter() - t0 < self.seconds:
            return None
        self.done = True
        return (step - s0) / max(self._now() - t0, 1e-9)


class Reporter:
    """log.txt, TensorBoard, console lines and the progress bar of rank 0; a no-op elsewhere.

    Args:
        workdir: the run folder (log.txt is appended to, TensorBoard writes tb/).
        enabled: False on every rank but 0.
        total, initial: the run's last step and the step it starts from.
        batch_size: the global batch, for the bar's images/s.
        quiet: no bar and no routine lines on the console; `warn` lines still appear.
    """

    def __init__(self, workdir: Path, *, enabled: bool, total: int, initial: int,
                 batch_size: int, quiet: bool = False):
        self.enabled, self.quiet, self.batch_size = enabled, quiet, batch_size
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.log = open(Path(workdir) / "log.txt", "a", buffering=1)
        # A resumed run drops the events a killed one logged after its checkpoint (steps
        # above `initial`), which it logs again, rather than showing those steps twice.
        self.writer = SummaryWriter(str(Path(workdir) / "tb"),
                                    purge_step=initial + 1 if initial > 0 else None)
        # disable=None: shown only when stderr is a terminal (not in batch logs).
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                        file=sys.stderr, dynamic_ncols=True, disable=True if quiet else None)

    @property
    def shows_bar(self) -> bool:
        return self.enabled and not self.bar.disable

    def _console(self, text: str) -> None:
        self._tqdm.write(text, file=sys.stderr)  # above the bar, which is redrawn below

    def line(self, text: str, *, console: bool = True) -> None:
        """Appends `text` to log.txt and, unless quiet or console=False, prints it."""
        if self.enabled:
            self.log.write(text + "\n")
            if console and not self.quiet:
                self._console(text)

    def warn(self, text: str) -> None:
        """Like `line`, but printed even when quiet."""
        if self.enabled:
            self.log.write(text + "\n")
            self._console(text)

    def scalars(self, prefix: str, values: Dict[str, float], step: int) -> None:
        if self.enabled:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def image(self, tag: str, picture, step: int) -> None:
        """Adds a PIL image (e.g. a sample grid) to TensorBoard."""
        if self.enabled:
            array = np.asarray(picture)
            self.writer.add_image(tag, array, step, dataformats="HW" if array.ndim == 2
                                  else "HWC")

    def advance(self, loss: Optional[float] = None) -> None:
        """Moves the bar one step; with `loss`, also refreshes its loss and images/s."""
        if not self.shows_bar:
            return
        if loss is not None:
            rate = self.bar.format_dict.get("rate")
            postfix = {"loss": f"{loss:.4g}" if math.isfinite(loss) else str(loss)}
            if rate:
                postfix["img/s"] = f"{rate * self.batch_size:.3g}"
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.log.close()
