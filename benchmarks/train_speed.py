"""Training throughput of the paper's CIFAR-10 models through the real training step.

Writes synthetic CIFAR-10 python batches (random 8-bit images, the standard file format) to a
temporary folder, so the whole input pipeline is timed, then for each model and precision mode
runs `Trainer.train_step` for warm-up steps and timed steps and prints images/s and peak memory.

    python benchmarks/train_speed.py --models ddpmpp,ncsnpp --modes fp32,bf16_cl_compile \
        --steps 50 --output train_speed.json

Modes: fp32 (TF32 off), tf32, bf16 (autocast), bf16_cl (+ channels-last), bf16_cl_compile
(+ torch.compile), bf16_cl_compile_ro (torch.compile mode "reduce-overhead": CUDA graphs).
Throughput needs CUDA to mean anything; on the CPU use tiny --steps.
"""
import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from score_sde.train import Trainer, apply_overrides, load_config_file  # noqa: E402

CONFIGS = {"ddpmpp": "cifar10_ddpmpp_cont.py", "ncsnpp": "cifar10_ncsnpp_cont.py",
           "ddpmpp_deep": "cifar10_ddpmpp_deep.py", "ncsnpp_deep": "cifar10_ncsnpp_deep.py",
           "ddpmpp_tiny": "cifar10_ddpmpp_cont.py"}
# Model kwargs replacing the config's: a DDPM++ small enough for smoke runs on a CPU.
MODEL_KWARGS = {"ddpmpp_tiny": dict(nf=16, ch_mult=(1, 2), num_res_blocks=1,
                                    attn_resolutions=(16,))}
MODES = {
    "fp32": dict(bf16=False, channels_last=False, compile=False, tf32=False),
    "tf32": dict(bf16=False, channels_last=False, compile=False, tf32=True),
    "bf16": dict(bf16=True, channels_last=False, compile=False, tf32=True),
    "bf16_cl": dict(bf16=True, channels_last=True, compile=False, tf32=True),
    "bf16_cl_compile": dict(bf16=True, channels_last=True, compile=True, tf32=True),
    "bf16_cl_compile_ro": dict(bf16=True, channels_last=True, compile=True,
                               compile_mode="reduce-overhead", tf32=True),
}


class _Quiet:
    def line(self, *_):
        pass


def write_synthetic_cifar(folder: Path, n_train: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    per = max(1, n_train // 5)
    for name, n in [(f"data_batch_{i}", per) for i in range(1, 6)] + [("test_batch", per)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def measure(model: str, mode: str, *, data_dir: str, batch_size: int, warmup: int, steps: int,
            device: str) -> dict:
    opts = dict(MODES[mode])
    tf32 = opts.pop("tf32")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    cfg = load_config_file(str(REPO / "configs" / CONFIGS[model]))
    overrides = {"data.data_dir": data_dir, "training.batch_size": batch_size,
                 "training.device": device, "training.n_iters": warmup + steps}
    overrides.update({f"training.{k}": v for k, v in opts.items()})
    if model in MODEL_KWARGS:
        overrides["model.kwargs"] = {**cfg.model.kwargs, **MODEL_KWARGS[model]}
    cfg = apply_overrides(cfg, overrides)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(cfg, workdir)
        dev = trainer.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        losses = []
        t_compile = time.perf_counter()
        for _ in range(warmup):
            losses.append(float(trainer.train_step(_Quiet())[0]))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        warm_s = time.perf_counter() - t_compile
        start = time.perf_counter()
        for _ in range(steps):
            loss = trainer.train_step(_Quiet())[0]
        losses.append(float(loss))  # synchronizes
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        params = sum(p.numel() for p in trainer.model.parameters())
        peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None
    return dict(model=model, mode=mode, batch_size=batch_size, steps=steps,
                params_m=round(params / 1e6, 2), images_per_s=steps * batch_size / seconds,
                ms_per_step=1e3 * seconds / steps, peak_gib=peak, warmup_s=warm_s,
                final_loss=losses[-1], device=str(dev),
                gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="ddpmpp,ncsnpp")
    p.add_argument("--modes", default="fp32,bf16_cl_compile")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    models, modes = args.models.split(","), args.modes.split(",")
    for name, known in (("model", CONFIGS), ("mode", MODES)):
        bad = [v for v in (models if name == "model" else modes) if v not in known]
        if bad:
            print(f"error: unknown {name} {bad[0]!r}; accepted: {', '.join(known)}",
                  file=sys.stderr)
            return 2
    rows = []
    with tempfile.TemporaryDirectory() as data_dir:
        write_synthetic_cifar(Path(data_dir), n_train=max(5 * args.batch_size, 1280))
        for model in models:
            for mode in modes:
                row = measure(model, mode, data_dir=data_dir, batch_size=args.batch_size,
                              warmup=args.warmup, steps=args.steps, device=args.device)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'model':<12}{'mode':<18}{'params':>8}{'img/s':>10}{'ms/step':>10}{'peak GiB':>10}")
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['model']:<12}{r['mode']:<18}{r['params_m']:>7.1f}M{r['images_per_s']:>10.0f}"
              f"{r['ms_per_step']:>10.1f}{peak:>10}")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
