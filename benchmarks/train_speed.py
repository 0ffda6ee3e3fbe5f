"""Training throughput of the paper's CIFAR-10 models through the real training step.

Writes synthetic CIFAR-10 python batches (random 8-bit images, the standard file format) to a
temporary folder, so the whole input pipeline is timed, then for each model and precision mode
runs `Trainer.train_step` for warm-up steps and timed steps and prints images/s and peak memory.

    python benchmarks/train_speed.py --models ddpmpp,ncsnpp --modes fp32,bf16_cl_compile \
        --steps 50 --output train_speed.json

Modes: fp32 (TF32 off), tf32, bf16 (autocast), bf16_cl (+ channels-last), bf16_cl_compile
(+ torch.compile), bf16_cl_compile_blocks (torch.compile of each repeated U-Net block instead
of the whole network: a shorter warm-up), bf16_cl_compile_ro (torch.compile mode
"reduce-overhead": CUDA graphs; its row records `cuda_graph_skips`, and the run stops with an
error if torch.compile ran any compiled graph of it without CUDA graphs).
Throughput needs CUDA to mean anything; on the CPU use tiny --steps.

--parity_steps N also trains N steps in fp32 and in each mode from the same initialisation,
batches and noise, and compares window means of the loss curves (relative difference and its
z-score against the spread of the per-step differences): a faster mode should track fp32
within noise.

--profile_steps N runs N more steps of each model and mode under torch.profiler and adds to
its row a `profile`: wall ms per step (synchronised), device time per step (the CUDA kernels'
time; on the CPU the summed self CPU time of the ops instead), kernels (ops) launched per step,
that time by category (`KERNEL_CATEGORIES`) and the 15 costliest kernels; a Chrome trace of
the profiled steps goes to --trace_dir (default: the folder of --output):

    python benchmarks/train_speed.py --models ddpmpp --modes tf32,bf16_cl_compile \
        --warmup 8 --steps 30 --profile_steps 5 --output profile/train_speed.json
"""
import argparse
import json
import pickle
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _args  # noqa: E402
from score_sde.config import apply_overrides, load_config_file  # noqa: E402
from score_sde.trainer import Trainer  # noqa: E402

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
    "bf16_cl_compile_blocks": dict(bf16=True, channels_last=True, compile=True,
                                   compile_scope="blocks", tf32=True),
    "bf16_cl_compile_ro": dict(bf16=True, channels_last=True, compile=True,
                               compile_mode="reduce-overhead", tf32=True),
}


# Where a step's device time goes: a regular expression of kernel (on the CPU: op) names per
# category, searched case-insensitively in this order; the first that matches wins, and a name
# matching none is "other". The order settles overlaps: cuDNN's format conversions are layout,
# not convolution; group norm's elementwise and reduction kernels are normalisation; Inductor
# names a fused kernel after every op it absorbed (triton_poi_fused_add_convolution_0 is the
# bias add after a convolution), so its prefix (poi: pointwise, red / per: reduction) decides
# before the op names do; cuDNN's implicit-GEMM convolutions are convolutions, not matmuls.
KERNEL_CATEGORIES = {
    "layout": r"nchwtonhwc|nhwctonchw|copy_|to_copy|direct_copy|contiguous|clone|permute"
              r"|transpose",
    "memcpy": r"memcpy|memset",
    "optimizer": r"adam|_foreach|multi_tensor_apply",
    "normalisation": r"group_?norm|rowwisemoments|fusedparams|internalgradients|gammabeta",
    "elementwise": r"^triton_poi|elementwise|silu|sigmoid|dropout|bernoulli"
                   r"|^aten::(add|mul|sub|div|exp|sqrt|rsqrt|neg|fill|zero|where|lerp|pow)_?$",
    "reduction": r"^triton_(red|per)|\breduce_kernel"
                 r"|^aten::(sum|mean|amax|norm|linalg_vector_norm)",
    "convolution": r"convol|conv2d|cudnn_conv|mkldnn_conv|fprop|dgrad|wgrad|implicit_gemm"
                   r"|winograd",
    "matmul_attention": r"gemm|gemv|splitkreduce|matmul|^aten::(mm|bmm|addmm|baddbmm|linear)$"
                        r"|cutlass|attention|flash|fmha|softmax",
}
PROFILE_TOP = 15  # kernels listed per profile


def kernel_category(name: str) -> str:
    """The `KERNEL_CATEGORIES` key of a kernel (or op) name, or "other"."""
    for category, pattern in KERNEL_CATEGORIES.items():
        if re.search(pattern, name, flags=re.IGNORECASE):
            return category
    return "other"


def profile_summary(kernels: dict, *, steps: int, wall_ms: float, device_type: str) -> dict:
    """A profile's numbers per step from {kernel name: (total microseconds, launches)} over
    `steps` steps that took `wall_ms` per step."""
    total_us = sum(us for us, _ in kernels.values())
    by_category = {c: 0.0 for c in list(KERNEL_CATEGORIES) + ["other"]}
    for name, (us, _) in kernels.items():
        by_category[kernel_category(name)] += us
    top = sorted(kernels.items(), key=lambda item: -item[1][0])[:PROFILE_TOP]
    return dict(
        steps=steps, wall_ms_per_step=wall_ms,
        device_time=("CUDA kernel time" if device_type == "cuda"
                     else "self CPU time of the ops (no device kernels)"),
        device_ms_per_step=total_us / 1e3 / steps,
        launches_per_step=sum(n for _, n in kernels.values()) / steps,
        categories={c: dict(ms_per_step=us / 1e3 / steps,
                            percent=100 * us / total_us if total_us else 0.0)
                    for c, us in by_category.items()},
        top=[dict(name=name, category=kernel_category(name), ms_per_step=us / 1e3 / steps,
                  launches_per_step=n / steps) for name, (us, n) in top])


def profile_steps(trainer: Trainer, steps: int, *, trace: Optional[Path] = None) -> dict:
    """`steps` more `Trainer.train_step` calls under torch.profiler (`profile_summary`); CUDA
    kernels are timed when the trainer runs on CUDA, else the CPU ops. Writes a Chrome trace
    to `trace` (gzipped when its name ends in .gz) if given."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    dev = trainer.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    _sync(dev)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(_Quiet())
        _sync(dev)
        seconds = time.perf_counter() - start
    kernels = {}
    for event in prof.events():
        if dev.type == "cuda":
            if event.device_type != DeviceType.CUDA:
                continue
            us = event.time_range.elapsed_us()
        else:
            if event.device_type != DeviceType.CPU or event.is_async:
                continue
            us = event.self_cpu_time_total
        total, count = kernels.get(event.name, (0.0, 0))
        kernels[event.name] = (total + us, count + 1)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    result = profile_summary(kernels, steps=steps, wall_ms=1e3 * seconds / steps,
                             device_type=dev.type)
    result["trace"] = str(trace) if trace is not None else None
    return result


def format_profile(model: str, mode: str, p: dict) -> str:
    """A profile as a printable table: the categories, then the costliest kernels."""
    lines = [f"\n{model} {mode}: {p['wall_ms_per_step']:.1f} ms/step wall, "
             f"{p['device_ms_per_step']:.1f} ms/step {p['device_time']}, "
             f"{p['launches_per_step']:.0f} launches/step ({p['steps']} steps profiled)",
             f"  {'category':<18}{'ms/step':>10}{'%':>7}"]
    lines += [f"  {c:<18}{v['ms_per_step']:>10.2f}{v['percent']:>7.1f}"
              for c, v in p["categories"].items()]
    lines.append(f"  {'top kernels':<60}{'category':>18}{'ms/step':>10}{'calls':>7}")
    lines += [f"  {k['name'][:58]:<60}{k['category']:>18}{k['ms_per_step']:>10.3f}"
              f"{k['launches_per_step']:>7.0f}" for k in p["top"]]
    return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def make_trainer(model: str, mode: str, workdir: str, *, data_dir: str, batch_size: int,
                 n_iters: int, device: str) -> Trainer:
    """A Trainer of `model` in precision `mode` (TF32 switched as the mode says)."""
    opts = dict(MODES[mode])
    tf32 = opts.pop("tf32")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    cfg = load_config_file(str(REPO / "configs" / CONFIGS[model]))
    overrides = {"data.data_dir": data_dir, "training.batch_size": batch_size,
                 "training.device": device, "training.n_iters": n_iters}
    overrides.update({f"training.{k}": v for k, v in opts.items()})
    if model in MODEL_KWARGS:
        overrides["model.kwargs"] = {**cfg.model.kwargs, **MODEL_KWARGS[model]}
    return Trainer(apply_overrides(cfg, overrides), workdir)


def _cudagraph_skips() -> int:
    """Compiled graphs torch.compile has run without CUDA graphs so far in this process."""
    from torch._dynamo.utils import counters
    return int(counters["inductor"].get("cudagraph_skips", 0))


def measure(model: str, mode: str, *, data_dir: str, batch_size: int, warmup: int, steps: int,
            device: str, profile: int = 0, trace: Optional[Path] = None) -> dict:
    """Times `steps` training steps after `warmup` ones; with `profile` > 0, then profiles
    that many more (`profile_steps`, its Chrome trace written to `trace`)."""
    claims_graphs = MODES[mode].get("compile_mode") == "reduce-overhead"
    skips_before = _cudagraph_skips()
    with tempfile.TemporaryDirectory() as workdir:
        trainer = make_trainer(model, mode, workdir, data_dir=data_dir, batch_size=batch_size,
                               n_iters=warmup + steps + profile, device=device)
        dev = trainer.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        losses = []
        t_compile = time.perf_counter()
        for _ in range(warmup):
            losses.append(float(trainer.train_step(_Quiet())[0]))
        _sync(dev)
        warm_s = time.perf_counter() - t_compile
        start = time.perf_counter()
        for _ in range(steps):
            loss = trainer.train_step(_Quiet())[0]
        losses.append(float(loss))  # synchronizes
        _sync(dev)
        seconds = time.perf_counter() - start
        params = sum(p.numel() for p in trainer.model.parameters())
        peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None
        profiled = profile_steps(trainer, profile, trace=trace) if profile > 0 else None
    row = dict(model=model, mode=mode, batch_size=batch_size, steps=steps,
               params_m=round(params / 1e6, 2), images_per_s=steps * batch_size / seconds,
               ms_per_step=1e3 * seconds / steps, peak_gib=peak, warmup_s=warm_s,
               final_loss=losses[-1], device=str(dev),
               gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu")
    if profiled is not None:
        row["profile"] = profiled
    if claims_graphs:
        skips = _cudagraph_skips() - skips_before
        row.update(cuda_graph_skips=skips, replayed=dev.type == "cuda" and skips == 0)
        if not row["replayed"]:
            raise RuntimeError(f"mode {mode} claims CUDA graphs but torch.compile ran "
                               f"{skips} compiled graph(s) without them on {dev}")
    return row


def loss_curve(model: str, mode: str, *, data_dir: str, batch_size: int, steps: int,
               device: str) -> np.ndarray:
    """Per-step training losses of `steps` steps from the seeded initialisation: every mode sees
    the same batches and the same noise (all seeded from the step)."""
    with tempfile.TemporaryDirectory() as workdir:
        trainer = make_trainer(model, mode, workdir, data_dir=data_dir, batch_size=batch_size,
                               n_iters=steps, device=device)
        losses = [trainer.train_step(_Quiet())[0].detach().float() for _ in range(steps)]
        return torch.stack(losses).cpu().double().numpy()


def parity(curves: dict, reference: str, window: int) -> list:
    """Window means of each mode's loss curve against the reference mode's: the difference in
    units of its standard error (from the spread of the per-step differences in the window;
    the noise is shared, so differences are far less noisy than either curve)."""
    rows = []
    ref = curves[reference]
    for mode, curve in curves.items():
        if mode == reference:
            continue
        windows = []
        for start in range(0, len(ref) - window + 1, window):
            a, b = curve[start:start + window], ref[start:start + window]
            diff = a - b
            se = diff.std(ddof=1) / np.sqrt(window)
            windows.append(dict(start=start, mean=float(a.mean()), reference_mean=float(b.mean()),
                                rel_diff=float(diff.mean() / b.mean()),
                                z=float(diff.mean() / se) if se > 0 else 0.0))
        rows.append(dict(mode=mode, reference=reference, window=window, windows=windows,
                         max_abs_rel_diff=max(abs(w["rel_diff"]) for w in windows),
                         max_abs_z=max(abs(w["z"]) for w in windows)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="ddpmpp,ncsnpp")
    p.add_argument("--modes", default="fp32,bf16_cl_compile")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--parity_steps", type=int, default=0,
                   help="also train this many steps per mode and compare the loss curves with "
                        "fp32 (0: off)")
    p.add_argument("--parity_window", type=int, default=100)
    p.add_argument("--profile_steps", type=int, default=0,
                   help="after the timed steps, profile this many more per model and mode "
                        "(0: off)")
    p.add_argument("--trace_dir", default=None,
                   help="folder for the profiles' Chrome traces (default: that of --output; "
                        "none without either)")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    _args.device(p, "device", args.device)
    _args.at_least(p, "batch_size", args.batch_size, 1)
    _args.at_least(p, "steps", args.steps, 1)
    _args.at_least(p, "warmup", args.warmup, 0)
    _args.at_least(p, "parity_steps", args.parity_steps, 0)
    if args.parity_steps:
        _args.at_least(p, "parity_window", args.parity_window, 2)  # a window's noise needs 2
    _args.output_file(p, "output", args.output)
    if args.profile_steps < 0:
        p.error(f"--profile_steps must be >= 0, got {args.profile_steps}")
    if args.trace_dir is not None and args.profile_steps == 0:
        p.error("--trace_dir needs --profile_steps")
    trace_dir = (Path(args.trace_dir) if args.trace_dir is not None
                 else Path(args.output).parent if args.output else None)
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
                trace = (trace_dir / f"trace_{model}_{mode}.json.gz"
                         if trace_dir is not None and args.profile_steps else None)
                row = measure(model, mode, data_dir=data_dir, batch_size=args.batch_size,
                              warmup=args.warmup, steps=args.steps, device=args.device,
                              profile=args.profile_steps, trace=trace)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'model':<12}{'mode':<24}{'params':>8}{'img/s':>10}{'ms/step':>10}{'peak GiB':>10}")
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['model']:<12}{r['mode']:<24}{r['params_m']:>7.1f}M{r['images_per_s']:>10.0f}"
              f"{r['ms_per_step']:>10.1f}{peak:>10}")
    for r in rows:
        if "profile" in r:
            print(format_profile(r["model"], r["mode"], r["profile"]))
    if args.parity_steps > 0:
        with tempfile.TemporaryDirectory() as data_dir:
            write_synthetic_cifar(Path(data_dir), n_train=max(5 * args.batch_size, 1280))
            for model in models:
                curves = {mode: loss_curve(model, mode, data_dir=data_dir,
                                           batch_size=args.batch_size, steps=args.parity_steps,
                                           device=args.device)
                          for mode in ["fp32"] + [m for m in modes if m != "fp32"]}
                for row in parity(curves, "fp32", min(args.parity_window, args.parity_steps)):
                    row["model"] = model
                    rows.append(row)
                    print(f"{model:<12}{row['mode']:<24} loss vs fp32 over {args.parity_steps} "
                          f"steps: max |rel diff| {row['max_abs_rel_diff']:.4f}, max |z| "
                          f"{row['max_abs_z']:.2f} (windows of {row['window']})")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
