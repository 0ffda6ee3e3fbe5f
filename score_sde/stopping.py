"""Stopping a training run on SIGINT or SIGTERM without losing its work.

Ctrl-C (SIGINT), a scheduler's preemption and torchrun's shutdown (SIGTERM, or SIGINT passed on)
should end a run the way its next checkpoint would: `SignalStop` turns the signals into a
request that the training loop reads between steps; the loop writes a checkpoint and raises
`TrainingInterrupted`, which the command line reports in one line with exit status
128 + signal number (130 for SIGINT, 143 for SIGTERM).

What a signal does depends on where the run is:
- before the loop (loading data, building the model) nothing can be lost, so it raises
  `TrainingInterrupted` at once;
- inside the loop (`deferred`) it is only recorded, so the current step finishes and the
  checkpoint that follows is complete; repeated signals are ignored (torchrun passes on the
  Ctrl-C its workers already got);
- inside `abandonable` blocks (sample grids, held-out losses) it raises `Abandoned` at once:
  that work is dropped rather than waited for.
"""
import contextlib
import signal
import threading
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM; its checkpoint (if any step ran) is written.

    A KeyboardInterrupt, so that `except Exception` clauses let it pass, as they do Ctrl-C.

    Attributes:
        signum: the signal (signal.SIGINT or signal.SIGTERM).
        step: the step of the checkpoint written, None if training had not started.
        exit_status: 128 + signum, the shell's convention for a process ended by a signal.
    """

    def __init__(self, signum: int, step: Optional[int] = None):
        self.signum, self.step = signum, step
        name = signal.Signals(signum).name
        if step is None:
            message = f"stopped by {name} before training started; nothing was written"
        else:
            message = f"stopped at step {step} ({name}); run the same command to resume"
        super().__init__(message)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return self.args[0]


class Abandoned(BaseException):
    """Raised inside `SignalStop.abandonable` blocks when a stop is requested."""


class SignalStop:
    """Handlers for SIGINT and SIGTERM, installed while used as a context manager (in the main
    thread only; elsewhere signals keep their handlers and `signum` stays None).

    Attributes:
        signum: the first signal received, None if none.
    """

    def __init__(self):
        self.signum: Optional[int] = None
        self._mode = "raise"  # "raise", "defer" or "abandon": see the module docstring
        self._previous = {}

    def __enter__(self) -> "SignalStop":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        if self._mode == "raise":
            raise TrainingInterrupted(signum)
        if self._mode == "abandon":
            raise Abandoned()

    def defer(self) -> None:
        """From now on signals are only recorded (the training loop polls `signum`)."""
        self._mode = "defer"

    @contextlib.contextmanager
    def abandonable(self):
        """A block whose work is dropped on a stop request: raises `Abandoned` at once if one
        is pending or arrives inside it."""
        if self.signum is not None:
            raise Abandoned()
        previous, self._mode = self._mode, "abandon"
        try:
            yield
        finally:
            self._mode = previous
