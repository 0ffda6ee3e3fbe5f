"""Exports a trained run's EMA weights alone, optionally in float16, for evaluation elsewhere.

Example:
    python tools/export_weights.py --workdir runs/vp_fashion_mnist --output vp_fm.pt --fp16
    python tools/likelihood.py --workdir /tmp/eval --checkpoint vp_fm.pt
    python tools/sample.py --workdir /tmp/eval --checkpoint vp_fm.pt --num_samples 64

Run it from an install of the package (`pip install -e .`) or with PYTHONPATH set to the
repository root.

The output holds the EMA weights, the step, the config and the data description: what
`score_sde.runs.load_trained`, tools/likelihood.py --checkpoint and tools/sample.py
--checkpoint need to rebuild the network, without the raw weights and the optimizer state (a
quarter of a training checkpoint's size; with --fp16 an eighth). It is written atomically with a
checksum, like a checkpoint. Weights stored in float16 are loaded back into float32; the
network then computes in float32 as before, from weights rounded to float16.

Output: one JSON line (output file, bytes, step, dtype, parameter count). Exit status: 0
done; 2 bad input (no such checkpoint, not a training checkpoint, an existing --output
without --overwrite, or a weight beyond float16's range with --fp16), one line on stderr;
4 a file that cannot be read or written (no permission, a full disk), one line.
"""
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

from score_sde.cli import InputError, check_path, run_tool
from score_sde.runs import export_weights


def define_flags(fv) -> None:
    """Defines the tool's flags on the absl FlagValues `fv`."""
    from absl import flags

    kw = dict(flag_values=fv)
    flags.DEFINE_string("workdir", None, "Training run folder (its checkpoint.pt is read).", **kw)
    flags.DEFINE_string("checkpoint", None, "Checkpoint to export instead of "
                        "WORKDIR/checkpoint.pt (a snapshot, say).", **kw)
    flags.DEFINE_string("output", None, "File to write.", **kw)
    flags.DEFINE_boolean("fp16", False, "Store the weights in float16.", **kw)
    flags.DEFINE_boolean("overwrite", False, "Replace an existing --output.", **kw)
    flags.mark_flags_as_required(["output"], flag_values=fv)


def run(fv) -> Dict[str, object]:
    """Exports with parsed flags; returns the summary.

    Raises:
        InputError, ValueError, FileNotFoundError, CheckpointError: bad input.
    """
    if fv.checkpoint is None and fv.workdir is None:
        raise InputError("pass --workdir RUN (its checkpoint.pt) or --checkpoint FILE")
    checkpoint = Path(fv.checkpoint) if fv.checkpoint else Path(fv.workdir) / "checkpoint.pt"
    output = check_path("output", Path(fv.output))
    if output.exists() and not fv.overwrite:
        raise InputError(f"--output {output} exists; pass --overwrite to replace it")
    if output.resolve() == checkpoint.resolve():
        raise InputError(f"--output {output} is the checkpoint being exported")
    return export_weights(checkpoint, output, half=fv.fp16)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (see the module docstring)."""
    return run_tool(argv, __doc__, define_flags, run)


if __name__ == "__main__":
    sys.exit(main())
