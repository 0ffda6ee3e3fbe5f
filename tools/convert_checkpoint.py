"""Converts a checkpoint of the paper's public PyTorch code (score_sde_pytorch) into a run.

Example:
    python tools/convert_checkpoint.py checkpoint_8.pth \\
        --config vp/cifar10_ddpmpp_continuous --workdir runs/paper_vp_cifar10
    python tools/likelihood.py --workdir runs/paper_vp_cifar10 --data_dir cifar-10-batches-py
    python tools/sample.py --workdir runs/paper_vp_cifar10 --num_samples 64

Run it from an install of the package (`pip install -e .`) or with PYTHONPATH set to the
repository root.

CHECKPOINT is a file saved by the paper's code: a dict with "model" (the state dict of its
DataParallel NCSN++, keys "module.all_modules.N..."), "ema" ("shadow_params": the EMA weights
in parameter order), "optimizer" and "step". --config names the config file it was trained with,
by its path under the paper code's configs/ without ".py" (the continuous-time CIFAR-10 DDPM++
and NCSN++ models, deep ones too, for vp, subvp and ve, and ve's 256 x 256 and 1024 x 1024
NCSN++ models; --help lists them). The file is read with torch.load(weights_only=True), so no
pickled code runs.

WORKDIR receives checkpoint.pt (the raw and the EMA weights as our NCSNpp, with the SDE, the
score-function conventions and the data range of the paper's code; see score_sde/convert.py)
and config.json; tools/likelihood.py, tools/sample.py and score_sde.runs.load_trained read it.
The optimizer state is not converted: the run cannot be resumed by the trainer. An existing
WORKDIR/checkpoint.pt is only replaced with --overwrite.

Output: one JSON line (checkpoint written, step, reference config, SDE, parameter count,
data range). Exit status: 0 done; 2 bad input (unknown --config, an unreadable file, or a
checkpoint whose keys or shapes do not fit the config: one line on stderr naming the first
mismatching key); 4 a file that cannot be read or written (no permission, a full disk), one line.
"""
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

from score_sde.cli import InputError, run_tool, sha256_file
from score_sde.convert import (REFERENCE_CONFIGS, check_run_folder, convert_checkpoint,
                               load_reference_checkpoint, reference_config, write_run)


def define_flags(fv) -> None:
    """Defines the tool's flags on the absl FlagValues `fv`."""
    from absl import flags

    kw = dict(flag_values=fv)
    flags.DEFINE_string("config", None, "The paper code's config, by its path under its "
                        f"configs/ without .py: {', '.join(REFERENCE_CONFIGS)}.", **kw)
    flags.DEFINE_string("workdir", None, "Run folder to write (checkpoint.pt, config.json).",
                        **kw)
    flags.DEFINE_boolean("overwrite", False, "Replace an existing WORKDIR/checkpoint.pt.", **kw)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def run(fv, checkpoint: str) -> Dict[str, object]:
    """Converts with parsed flags; returns the summary.

    Raises:
        ValueError, FileNotFoundError: bad input.
    """
    ref = reference_config(fv.config)  # an unknown name fails before the file is read
    check_run_folder(fv.workdir, overwrite=fv.overwrite)  # ... and so does the run folder
    path = Path(checkpoint)
    if (Path(fv.workdir) / "checkpoint.pt").resolve() == path.resolve():
        # --overwrite replaces an earlier conversion, never the checkpoint being converted.
        raise InputError(f"--workdir {fv.workdir} would replace CHECKPOINT {path} itself; "
                         f"choose another --workdir")
    source = load_reference_checkpoint(path)
    state = convert_checkpoint(source, fv.config, source={
        "checkpoint": str(path.resolve()), "sha256": sha256_file(path)})
    out = write_run(state, fv.workdir, overwrite=fv.overwrite)
    return {"checkpoint": str(out), "step": state["step"], "reference_config": fv.config,
            "sde": ref.sde,
            "num_params": sum(p.numel() for p in ref.meta_network().parameters()),
            "data_range": list(ref.data_range)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (see the module docstring)."""
    return run_tool(argv, __doc__, define_flags, run, positional=("checkpoint",))


if __name__ == "__main__":
    sys.exit(main())
