"""Samples from a trained checkpoint: generation, inpainting, colorization, interpolation.

Examples:
    python tools/sample.py --workdir runs/vp_fashion_mnist --num_samples 64
    python tools/sample.py --workdir runs/vp_fashion_mnist --sampler ode --rtol 1e-5
    python tools/sample.py --workdir runs/ve_cifar10 --sampler ald --num_steps 1000
    python tools/sample.py --workdir W --task inpaint --mask right --num_samples 16
    python tools/sample.py --workdir W --task colorize --data_dir ~/data/cifar10
    python tools/sample.py --workdir W --class_label 3 --guidance cfg --guidance_scale 2
    python tools/sample.py --workdir W --class_label 3 --guidance classifier \\
        --classifier runs/noisy_classifier.pt --guidance_scale 1
    python tools/sample.py --workdir W --task interpolate --num_samples 4 --num_interp 8

Run it from an install of the package (`pip install -e .`) or with PYTHONPATH set to the
repository root.

Samplers. pc: predictor-corrector (Song et al. 2021, Algorithm 1; --predictor, --corrector,
--snr, --num_steps, --corrector_steps); ode: the probability-flow ODE with an adaptive solver
(--rtol, --atol); ald: annealed Langevin dynamics (corrector "ald" alone, Song & Ermon 2019);
few-step samplers (generate only): ddim (--num_steps, default 50, --eta) and dpm_solver
(--num_steps, default 20, --order, --dpm_method, --dpm_solver_type), each num_steps + 1
evaluations with the final denoising, and heun (EDM, --num_steps, default 18, 2 num_steps - 1
evaluations).
The last step is taken at --eps (default 1e-3 for VP / sub-VP, 1e-5 for VE) and denoises: pc
steps on to t = 0 without noise, ald ends with Tweedie's formula, ode and the few-step samplers
with the denoiser.

Tasks. generate; inpaint (known pixels from the data split, --mask left|right|top|bottom|
center|random or a .npy file of 0/1 values shaped like one image, 1 = known; the known pixels
are returned exactly and the generated ones carry no leftover noise); colorize (RGB data: the
grayscale of each data image is kept, colours are generated); interpolate (two data images are
encoded with the probability-flow ODE, their latents interpolated spherically and decoded).
Source images are the first --num_samples of --split (default test) of the checkpoint's
dataset (--data_dir / --data_path override where it is read from).

Classes. --class_label K (or -1: labels 0, 1, 2, ... cycling) conditions on a class: for a
class-conditional network by its label input, with --guidance cfg at scale w the score is
(1 + w) s(x, y) - w s(x) (classifier-free guidance); with --guidance classifier, the gradient
of a time-dependent classifier from tools/train_classifier.py is added at --guidance_scale.

Output (--output_dir, default WORKDIR/samples_<task>): samples.npz ("samples": uint8 images
[N, C, H, W] for 8-bit datasets, else float32 in the data's units; "labels" when conditioned;
"inputs" and "masks" for inpainting and colorization; "frames" [N, num_interp, ...] for
interpolation), samples.png (a grid, or a scatter plot with axes for 2-D data) and
summary.json, also printed as one JSON line on stdout: nfe (score evaluations per batch; with
--guidance cfg each costs two network passes, network_passes_per_eval), seconds, and the
settings. A progress bar over batches (--noprogress: none) and one line for people (samples,
sampler, mean NFE, seconds, picture) go to stderr.

--cuda_graph (CUDA): the network is recorded once per batch shape as a CUDA graph and replayed
at every evaluation (`score_sde.cuda_graphs.CudaGraphed`), which removes most per-kernel
launch cost at moderate batch sizes; summary.json's "cuda_graph" counts graphs, replays and
eager calls and lists any recording failures.

A flag that the others leave without effect is refused (exit 2, one line naming what it
needs) rather than recorded in summary.json as if it had been used: --num_steps with --sampler
ode or --task interpolate, --eta without --sampler ddim, --order, --dpm_method and
--dpm_solver_type without --sampler dpm_solver, --predictor and --corrector without --sampler
pc, --snr and --corrector_steps without corrector steps, --rtol and --atol without the ODE,
--mask without --task inpaint, --num_interp without --task interpolate, the source-image flags
with --task generate, --guidance_scale without --guidance, --classifier without --guidance
classifier, and --sampler other than ode with --task interpolate.

Exit status: 0 done; 2 bad input (one line on stderr; memory that runs out: the line names
--batch_size and --num_samples); 3 non-finite samples; 4 a file that cannot be read or written
(no permission, a full disk), one line; 130 Ctrl-C.
"""
import sys

try:  # Ctrl-C while torch loads (seconds) gives the one line it gives during the work
    import time
    from pathlib import Path
    from typing import Dict, Optional, Sequence

    import numpy as np
    import torch

    from score_sde._utils import out_of_memory, stderr_line
    from score_sde.cli import (EXIT_INTERRUPTED, InputError, check_distinct, check_not_data,
                               check_path, run_tool, write_atomic, write_json)
    from score_sde.config import MAX_SEED, from_dict
    from score_sde.datasets import (DATASETS, SPLITS, from_model_range, load_dataset,
                                    to_model_range)
    from score_sde.distributed import resolve_device
    from score_sde.cuda_graphs import CudaGraphed
    from score_sde.fast_sampling import sample_ddim, sample_dpm_solver, sample_heun
    from score_sde.ode import sample_ode
    from score_sde.runs import data_source, load_trained
    from score_sde.sampling import CORRECTORS, PREDICTORS, sample_pc
    from score_sde.build import build_sde
    from score_sde.visualize import samples_picture
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    sys.stderr.write("interrupted (SIGINT)\n")
    sys.exit(130)

SAMPLERS = ("pc", "ode", "ald", "ddim", "dpm_solver", "heun")
FAST = ("ddim", "dpm_solver", "heun")
TASKS = ("generate", "inpaint", "colorize", "interpolate")
MASKS = ("left", "right", "top", "bottom", "center", "random")
GUIDANCE = ("none", "cfg", "classifier")


def built_in_mask(name: str, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """A 0/1 mask [C, H, W] (1 = known) for image shape (C, H, W)."""
    c, h, w = shape
    m = torch.zeros(h, w)
    if name == "left":  # the left half is known, the right half generated
        m[:, : w // 2] = 1
    elif name == "right":
        m[:, w // 2:] = 1
    elif name == "top":
        m[: h // 2] = 1
    elif name == "bottom":
        m[h // 2:] = 1
    elif name == "center":  # everything but a centred square is known
        m[:] = 1
        m[h // 4: h - h // 4, w // 4: w - w // 4] = 0
    else:  # random: each pixel known with probability 1/2
        m = (torch.rand(h, w, generator=generator) < 0.5).float()
    return m.expand(c, h, w).clone()


def load_mask(spec: str, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    if spec in MASKS:
        return built_in_mask(spec, shape, generator)
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--mask {spec!r} is neither one of {', '.join(MASKS)} nor a file")
    try:
        arr = np.load(path, allow_pickle=False)
        if not isinstance(arr, np.ndarray):  # an .npz archive loads as a mapping of arrays
            raise ValueError(f"it is an .npz archive of {', '.join(arr.files) or 'no arrays'}")
        m = torch.as_tensor(np.asarray(arr, dtype=np.float32))
    except (ValueError, TypeError, OSError) as err:
        raise InputError(f"--mask {path} is not a .npy array of 0 and 1: {err}") from None
    if not bool(((m == 0) | (m == 1)).all()):
        raise InputError(f"--mask {path} must hold only 0 and 1 (1 = known pixel)")
    try:
        return torch.broadcast_to(m, tuple(shape)).clone()
    except RuntimeError:
        raise InputError(f"--mask {path} has shape {tuple(m.shape)}, which does not broadcast "
                         f"to the image shape {tuple(shape)}") from None


def _labels(fv, k: Optional[int], n: int, offset: int, device) -> Optional[torch.Tensor]:
    """The labels of samples offset .. offset + n - 1 among k classes."""
    if fv.class_label is None:
        return None
    if fv.class_label == -1:
        return (torch.arange(offset, offset + n, device=device) % k).long()
    return torch.full((n,), fv.class_label, dtype=torch.long, device=device)


def _score_fn(fv, run, labels: Optional[torch.Tensor], classifier):
    from score_sde import controllable

    if labels is None or fv.guidance == "classifier" and classifier is None:
        return run.score_fn()
    if fv.guidance == "classifier":
        return controllable.classifier_guided_score(run.score_fn(), classifier, labels,
                                                    fv.guidance_scale)
    if fv.guidance == "cfg":
        return controllable.classifier_free_score(run.score_fn(labels), run.score_fn(),
                                                  fv.guidance_scale)
    return run.score_fn(labels)


def _check_flag_use(fv) -> None:
    """Refuses flags that conflict, and flags that the others leave without effect (which the
    summary would record as if they had been used); needs no checkpoint."""
    if fv.task in ("inpaint", "colorize") and fv.sampler != "pc":
        raise InputError(f"--task {fv.task} runs the predictor-corrector sampler; drop "
                         f"--sampler {fv.sampler}")
    if fv.task == "interpolate" and fv["sampler"].present and fv.sampler != "ode":
        raise InputError(f"--task interpolate encodes and decodes with the probability-flow "
                         f"ODE solver; drop --sampler {fv.sampler}")
    if fv.task == "interpolate" and fv.class_label is not None:
        raise InputError("--task interpolate is unconditional; drop --class_label")
    if fv.class_label is None and fv.guidance != "none":
        raise InputError(f"--guidance {fv.guidance} needs --class_label")
    if fv.cuda_graph and (fv.task != "generate" or fv.sampler == "ode"
                          or fv.class_label is not None):
        raise InputError("--cuda_graph replays the network of unconditional fixed-step "
                         "sampling (--task generate, --sampler pc, ald, ddim, dpm_solver or "
                         "heun, no --class_label)")
    if fv.guidance_scale < 0:
        raise InputError(f"--guidance_scale must be >= 0, got {fv.guidance_scale}")
    interpolate = fv.task == "interpolate"
    sampler = "ode" if interpolate else fv.sampler
    by_sampler = "--task interpolate (an ODE solve)" if interpolate else f"--sampler {sampler}"
    task = f"--task {fv.task}"
    corrects = sampler == "ald" or sampler == "pc" and fv.corrector != "none"
    no_correction = (by_sampler if sampler not in ("pc", "ald") else
                     "--corrector none" if not corrects else "--corrector_steps 0")
    source = "--task inpaint, colorize or interpolate (source images)"
    rules = {  # flag: (whether it takes effect, what it needs, what stops it otherwise)
        "eta": (sampler == "ddim", "--sampler ddim", by_sampler),
        "order": (sampler == "dpm_solver", "--sampler dpm_solver", by_sampler),
        "dpm_method": (sampler == "dpm_solver", "--sampler dpm_solver", by_sampler),
        "dpm_solver_type": (sampler == "dpm_solver" and fv.order > 1,
                            "--sampler dpm_solver at --order 2 or 3 (order 1 has one form)",
                            by_sampler if sampler != "dpm_solver" else "--order 1"),
        "predictor": (sampler == "pc", "--sampler pc", by_sampler),
        "corrector": (sampler == "pc" and fv.corrector_steps > 0,
                      "--sampler pc with --corrector_steps > 0",
                      by_sampler if sampler != "pc" else "--corrector_steps 0"),
        "corrector_steps": (corrects, "--sampler ald, or pc with a --corrector other than none",
                            no_correction),
        "snr": (corrects and fv.corrector_steps > 0, "corrector steps (--sampler ald, or pc "
                "with a --corrector other than none; --corrector_steps > 0)", no_correction),
        "num_steps": (sampler != "ode", "a fixed-step sampler (--sampler pc, ald, ddim, "
                      "dpm_solver or heun)", by_sampler),
        "rtol": (sampler == "ode", "--sampler ode or --task interpolate", by_sampler),
        "atol": (sampler == "ode", "--sampler ode or --task interpolate", by_sampler),
        "mask": (fv.task == "inpaint", "--task inpaint", task),
        "num_interp": (interpolate, "--task interpolate", task),
        "dataset": (fv.task != "generate", source, task),
        "data_dir": (fv.task != "generate", source, task),
        "data_path": (fv.task != "generate", source, task),
        "split": (fv.task != "generate", source, task),
        "guidance_scale": (fv.guidance != "none", "--guidance cfg or classifier",
                           "--guidance none"),
        "classifier": (fv.guidance == "classifier", "--guidance classifier",
                       f"--guidance {fv.guidance}"),
    }
    for name, (applies, needs, stopped_by) in rules.items():
        if fv[name].present and not applies:
            raise InputError(f"--{name} applies only with {needs}, not {stopped_by}")


def _check_flags(fv, run) -> None:
    """Refuses flags that do not fit the checkpoint."""
    info = run.info
    image = len(info.shape) == 3
    if fv.task in ("inpaint", "colorize") and not image:
        raise InputError(f"--task {fv.task} needs image data; the checkpoint's data has shape "
                         f"{info.shape}")
    if fv.task == "colorize" and info.shape[0] != 3:
        raise InputError(f"--task colorize needs RGB data; the checkpoint's images have "
                         f"{info.shape[0]} channel(s)")
    data_path = data_source(run.cfg, fv.dataset, fv.data_dir, fv.data_path)[2]
    if fv["split"].present and data_path is not None:
        raise InputError(f"--split does not apply to array data: {data_path} is read whole")
    if fv.class_label is not None:
        if fv.guidance == "classifier":  # the classifier's classes: checked once it is read
            if not fv.classifier:
                raise InputError("--guidance classifier needs --classifier PATH (a noisy "
                                 "classifier from tools/train_classifier.py)")
        elif run.num_classes is None:
            raise InputError("--class_label needs a class-conditional checkpoint or "
                             "--guidance classifier with --classifier PATH")
        else:
            _check_class_label(fv.class_label, run.num_classes)
    dropout = run.cfg.training.label_dropout
    if fv.guidance == "cfg" and run.num_classes is not None and dropout == 0:
        raise InputError("--guidance cfg needs the unconditional score of the null label, "
                         "which a run trained with label_dropout 0 never learnt; train with "
                         "--label_dropout > 0 (e.g. 0.1)")


def _check_class_label(label: int, k: int) -> None:
    if not -1 <= label < k:
        raise InputError(f"--class_label must lie in [-1, {k - 1}] ({k} classes; -1 cycles "
                         f"through them), got {label}")


def _check_outputs(fv, cfg, checkpoint: Path) -> None:
    """Refuses output files that are inputs: the checkpoint, the classifier, the mask file or
    a file of the data (the run's, or the one --dataset names)."""
    out_dir = _output_dir(fv)
    outputs = {f"output_dir ({name})": out_dir / name
               for name in ("samples.npz", "samples.png", "summary.json")}
    mask = fv.mask if fv.task == "inpaint" and fv.mask not in MASKS else None
    check_distinct({**outputs, "checkpoint": checkpoint, "classifier": fv.classifier,
                    "mask": mask})
    # The data a task reads, and the run's own (never written over either).
    for dataset, data_dir, data_path in {data_source(cfg, fv.dataset, fv.data_dir, fv.data_path),
                                         data_source(cfg)}:
        check_not_data(outputs, dataset, data_dir=data_dir, data_path=data_path)


def _source_images(fv, run, n: int) -> torch.Tensor:
    """The first n data samples of the split (of the array file), in the model's range."""
    cfg = run.cfg
    dataset, data_dir, data_path = data_source(cfg, fv.dataset, fv.data_dir, fv.data_path)
    split = "train" if data_path and not fv.data_path else fv.split
    ds, info = load_dataset(dataset, split=split, data_dir=data_dir, data_path=data_path,
                            seed=cfg.training.seed, num_samples=None)
    x = ds.tensors[0][:n]
    if len(x) < n:
        what = "images" if len(run.info.shape) == 3 else "points"
        where = data_path or f"the {split} split of {dataset}"
        if fv.task == "interpolate":  # two data samples per pair
            raise InputError(f"--num_samples {fv.num_samples} pairs need {n} {what}; {where} "
                             f"holds {len(x)}")
        raise InputError(f"--num_samples {n} exceeds the {len(x)} {what} in {where}")
    if tuple(x.shape[1:]) != tuple(run.info.shape):
        raise InputError(f"the {dataset} images have shape {tuple(x.shape[1:])}, the model "
                         f"takes {tuple(run.info.shape)}")
    if not info.discrete:
        return x.float()
    return to_model_range(x, dequantize=False, data_range=run.info.data_range)


def _to_output(x: torch.Tensor, info) -> np.ndarray:
    """Samples in the model's range as saved: uint8 for 8-bit data, else float32."""
    x = x.detach().cpu()
    return from_model_range(x, info.data_range).numpy() if info.discrete else x.float().numpy()


def _output_dir(fv) -> Path:
    """--output_dir, or samples_<task> in the run folder (--workdir, else the checkpoint's)."""
    if fv.output_dir:
        return Path(fv.output_dir)
    base = Path(fv.workdir) if fv.workdir else Path(fv.checkpoint or ".").parent
    return base / f"samples_{fv.task}"


def run(fv) -> Dict[str, object]:
    """Samples with parsed flags; returns the summary."""
    from score_sde import controllable

    wall = time.time()
    checkpoint = Path(fv.checkpoint) if fv.checkpoint else Path(fv.workdir or ".") / \
        "checkpoint.pt"
    if fv.workdir is None and fv.checkpoint is None:
        raise InputError("pass --workdir (a training run folder) or --checkpoint PATH")
    if checkpoint.is_dir():
        raise InputError(f"checkpoint {checkpoint} is a folder; pass --checkpoint FILE")
    if not checkpoint.is_file():
        raise InputError(f"checkpoint {checkpoint} does not exist")
    check_path("output_dir", _output_dir(fv), folder=True)  # now, not after sampling
    device = resolve_device(fv.device)
    run_ = load_trained(checkpoint, device=device, use_ema=fv.use_ema)
    _check_flags(fv, run_)
    _check_outputs(fv, run_.cfg, checkpoint)
    sde, info = run_.sde, run_.info
    eps = fv.eps if fv.eps is not None else sde.sampling_eps
    classifier, num_classes = None, run_.num_classes
    if fv.guidance == "classifier":
        from score_sde.config import sde_settings
        from score_sde.classifier import (NoiseConditionalClassifier, classifier_log_prob_fn,
                                          load_classifier)

        try:
            clf, meta = load_classifier(fv.classifier, device)
        except FileNotFoundError:
            raise InputError(f"--classifier {fv.classifier} does not exist") from None
        if not isinstance(clf, NoiseConditionalClassifier):
            raise InputError(f"--classifier {fv.classifier} is not a noisy (time-dependent) "
                             f"classifier; train one with tools/train_classifier.py --kind noisy")
        missing = [k for k in ("sde_config", "time_input") if not meta.get(k)]
        if missing:
            raise InputError(f"--classifier {fv.classifier} does not record its "
                             f"{' and '.join(missing)}; save it with tools/train_classifier.py")
        clf_cfg = from_dict({"sde": meta["sde_config"]})
        if sde_settings(clf_cfg.sde) != sde_settings(run_.cfg.sde):
            raise InputError(f"--classifier was trained on the {clf_cfg.sde.name} SDE "
                             f"{sde_settings(clf_cfg.sde)}, the checkpoint uses "
                             f"{sde_settings(run_.cfg.sde)}")
        if tuple(meta.get("image_shape", ())) != tuple(info.shape):
            raise InputError(f"--classifier takes images of shape {meta.get('image_shape')}, "
                             f"the checkpoint's data have shape {info.shape}")
        # Classifiers saved without a range were trained on the loaders' [-1, 1].
        clf_range = tuple(float(v) for v in meta.get("data_range") or (-1.0, 1.0))
        if info.data_range is not None and clf_range != tuple(info.data_range):
            raise InputError(f"--classifier was trained on images scaled to {list(clf_range)}, "
                             f"the checkpoint's model reads {list(info.data_range)}; train one "
                             f"for it with tools/train_classifier.py --sde_of RUN_FOLDER")
        # The classifier's own SDE (equal to the run's) sets its time input.
        classifier = classifier_log_prob_fn(clf, build_sde(clf_cfg), meta["time_input"])
        num_classes = clf.num_classes
        if fv.class_label is not None:
            _check_class_label(fv.class_label, num_classes)
    gen = torch.Generator(device=device).manual_seed(fv.seed)
    mask_gen = torch.Generator().manual_seed(fv.seed)
    n, bs = fv.num_samples, fv.batch_size
    outputs: Dict[str, list] = {"samples": [], "labels": [], "inputs": [], "masks": [],
                                "frames": []}
    nfes = []
    graphed = CudaGraphed(run_.score_fn()) if fv.cuda_graph else None
    from tqdm.auto import tqdm

    sources = _source_images(fv, run_, n * (2 if fv.task == "interpolate" else 1)) \
        if fv.task != "generate" else None
    mask = load_mask(fv.mask, info.shape, mask_gen) if fv.task == "inpaint" else None
    pc = dict(num_steps=fv.num_steps, eps=eps, snr=fv.snr, corrector_steps=fv.corrector_steps,
              generator=gen)
    if fv.sampler == "ald":
        pc.update(predictor="none", corrector="ald")
    else:
        pc.update(predictor=fv.predictor, corrector=fv.corrector)
    for start in tqdm(range(0, n, bs), desc=f"{fv.task} ({fv.sampler})", unit="batch",
                      disable=None if fv.progress else True):
        b = min(bs, n - start)
        labels = _labels(fv, num_classes, b, start, device)
        score_fn = graphed or _score_fn(fv, run_, labels, classifier)
        if fv.task == "generate":
            shape = (b, *info.shape)
            if fv.sampler == "ode":
                x, nfe = sample_ode(sde, score_fn, shape, rtol=fv.rtol, atol=fv.atol,
                                    eps=eps, device=device, generator=gen)
            elif fv.sampler == "ddim":
                x, nfe = sample_ddim(sde, score_fn, shape, num_steps=fv.num_steps or 50,
                                     eta=fv.eta, eps=eps, denoise=True, device=device,
                                     generator=gen)
            elif fv.sampler == "dpm_solver":
                x, nfe = sample_dpm_solver(sde, score_fn, shape, num_steps=fv.num_steps or 20,
                                           order=fv.order, method=fv.dpm_method,
                                           solver_type=fv.dpm_solver_type, eps=eps,
                                           denoise=True, device=device, generator=gen)
            elif fv.sampler == "heun":
                x, nfe = sample_heun(sde, score_fn, shape, num_steps=fv.num_steps or 18,
                                     eps=eps, device=device, generator=gen)
            else:
                x, nfe = sample_pc(sde, score_fn, (b, *info.shape), device=device, **pc)
        elif fv.task == "inpaint":
            known = sources[start:start + b].to(device)
            m = mask.to(device).expand_as(known)
            x, nfe = controllable.inpaint(sde, score_fn, known, m, **pc)
            outputs["inputs"].append(_to_output(known, info))
            outputs["masks"].append(m.cpu().numpy().astype(np.uint8))
        elif fv.task == "colorize":
            rgb = sources[start:start + b].to(device)
            gray = rgb.mean(dim=1, keepdim=True)
            x, nfe = controllable.colorize(sde, score_fn, gray, **pc)
            outputs["inputs"].append(_to_output(gray, info))
        else:
            pair = sources[2 * start: 2 * (start + b)].to(device)
            frames, nfe = controllable.interpolate(sde, score_fn, pair[0::2], pair[1::2],
                                                   num=fv.num_interp, rtol=fv.rtol,
                                                   atol=fv.atol, eps=eps)
            # frames [num_interp, b, ...] -> per pair [b, num_interp, ...]
            outputs["frames"].append(_to_output(frames.transpose(0, 1), info))
            x = frames[-1]
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(f"non-finite samples in the batch starting at sample "
                                     f"{start}")
        outputs["samples"].append(_to_output(x, info))
        if labels is not None:
            outputs["labels"].append(labels.cpu().numpy())
        nfes.append(int(nfe))
    out_dir = _output_dir(fv)
    sampler = "ode" if fv.task == "interpolate" else fv.sampler  # interpolation's encoder
    out_dir.mkdir(parents=True, exist_ok=True)
    # Each file is replaced whole (temporary file, then rename), and summary.json, which
    # describes the others, goes first and comes back last: an interrupted run never leaves
    # new samples beside an old run's summary.
    (out_dir / "summary.json").unlink(missing_ok=True)
    arrays = {k: np.concatenate(v) for k, v in outputs.items() if v}

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_atomic(out_dir / "samples.npz", write_npz)
    picture = arrays["frames"].reshape(-1, *info.shape) if "frames" in arrays else \
        arrays["samples"]
    value_range = (-1.0, 1.0)
    if info.discrete:
        picture = torch.from_numpy(picture.astype(np.float32)) / 127.5 - 1
    else:  # arrays of images, in their own units: shown from their lowest to highest value
        picture = torch.from_numpy(picture)
        finite = picture[torch.isfinite(picture)]
        if finite.numel() and float(finite.min()) < float(finite.max()):
            value_range = (float(finite.min()), float(finite.max()))
    # An interpolation's frames fill one row per pair.
    image = samples_picture(picture, title=f"step {run_.step}, {sampler} sampler",
                            cols=arrays["frames"].shape[1] if "frames" in arrays else None,
                            value_range=value_range)
    png = out_dir / "samples.png"
    if image is not None:
        write_atomic(png, image.save)
    else:
        png.unlink(missing_ok=True)  # an old run's, for other data
        png = None
    summary = {
        "checkpoint": str(checkpoint.resolve()), "step": run_.step, "use_ema": fv.use_ema,
        "sde": run_.cfg.sde.name, "task": fv.task, "sampler": sampler,
        "predictor": pc.get("predictor") if sampler in ("pc", "ald") else None,
        "corrector": pc.get("corrector") if sampler in ("pc", "ald") else None,
        "num_steps": fv.num_steps or {"ddim": 50, "dpm_solver": 20, "heun": 18, "ode": None}.get(
            sampler, sde.num_steps),
        "eta": fv.eta if fv.sampler == "ddim" else None,
        "order": fv.order if fv.sampler == "dpm_solver" else None,
        "dpm_method": fv.dpm_method if fv.sampler == "dpm_solver" else None,
        "dpm_solver_type": fv.dpm_solver_type if fv.sampler == "dpm_solver" else None,
        "snr": fv.snr if sampler in ("pc", "ald") else None, "rtol": fv.rtol, "atol": fv.atol,
        "eps": eps, "num_samples": n, "batch_size": bs, "seed": fv.seed,
        "class_label": fv.class_label, "guidance": fv.guidance,
        "guidance_scale": fv.guidance_scale if fv.guidance != "none" else None,
        "mask": fv.mask if fv.task == "inpaint" else None,
        "nfe": nfes, "nfe_mean": float(np.mean(nfes)),
        # classifier_free_score skips the unconditional pass at scale 0
        "network_passes_per_eval": (2 if fv.guidance == "cfg" and fv.class_label is not None
                                    and fv.guidance_scale != 0 else 1),
        "cuda_graph": None if graphed is None else graphed.stats(),
        "seconds": time.time() - wall,
        "device": str(device), "output_dir": str(out_dir),
        "png": str(png) if png else None,
    }
    write_json(out_dir / "summary.json", summary)
    stderr_line(summary_line(summary))
    return summary


def summary_line(summary: Dict[str, object]) -> str:
    """The run for people, one line: what was sampled, evaluations, time and where it went."""
    return (f"{summary['num_samples']} samples ({summary['task']}, {summary['sampler']} "
            f"sampler), mean NFE {summary['nfe_mean']:.1f} per batch, "
            f"{summary['seconds']:.1f} s -> {summary['png'] or summary['output_dir']}")


def define_flags(fv) -> None:
    from absl import flags

    kw = dict(flag_values=fv)
    f = flags
    f.DEFINE_string("workdir", None, "Run folder of the training script.", **kw)
    f.DEFINE_string("checkpoint", None, "Checkpoint file; default WORKDIR/checkpoint.pt.", **kw)
    f.DEFINE_enum("task", "generate", list(TASKS), "What to sample.", **kw)
    f.DEFINE_enum("sampler", "pc", list(SAMPLERS), "pc, ode, ald, or a few-step sampler: "
                  "ddim, dpm_solver, heun.", **kw)
    f.DEFINE_float("eta", 0.0, "ddim: 0 deterministic, 1 DDPM-like.", lower_bound=0.0,
                   upper_bound=1.0, **kw)
    f.DEFINE_integer("order", 2, "dpm_solver: order 1, 2 or 3.", lower_bound=1, upper_bound=3,
                     **kw)
    f.DEFINE_enum("dpm_method", "multistep", ["multistep", "singlestep"], "dpm_solver.", **kw)
    f.DEFINE_enum("dpm_solver_type", None, ["dpmsolver", "taylor"], "dpm_solver: the form of "
                  "the higher-order updates; default: the one measured more accurate for the "
                  "method, order and prediction "
                  "(score_sde.fast_sampling.DPM_DEFAULT_SOLVER_TYPES).", **kw)
    f.DEFINE_enum("predictor", "reverse_diffusion", list(PREDICTORS), "PC predictor.", **kw)
    f.DEFINE_enum("corrector", "langevin", list(CORRECTORS), "PC corrector.", **kw)
    f.DEFINE_float("snr", 0.16, "Corrector signal-to-noise ratio.", lower_bound=0.0, **kw)
    f.DEFINE_integer("num_steps", None, "Steps; default the SDE's (1000) for pc and ald, 50 "
                     "for ddim, 20 for dpm_solver, 18 for heun.", lower_bound=1, **kw)
    f.DEFINE_integer("corrector_steps", 1, "Corrector steps per time point.", lower_bound=0,
                     **kw)
    f.DEFINE_float("rtol", 1e-5, "ODE relative tolerance (sampler ode, interpolate).", **kw)
    f.DEFINE_float("atol", 1e-5, "ODE absolute tolerance (sampler ode, interpolate).", **kw)
    f.DEFINE_float("eps", None, "Final time; default 1e-3 (VP, sub-VP) or 1e-5 (VE).", **kw)
    f.DEFINE_integer("num_samples", 64, "Samples (pairs for interpolate).", lower_bound=1,
                     **kw)
    f.DEFINE_integer("batch_size", 64, "Samples per batch.", lower_bound=1, **kw)
    f.DEFINE_integer("seed", 0, "Seeds all sampling noise.", lower_bound=0,
                     upper_bound=MAX_SEED, **kw)
    f.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "auto: CUDA if available.", **kw)
    f.DEFINE_boolean("use_ema", True, "EMA weights (--nouse_ema: the raw weights).", **kw)
    f.DEFINE_string("output_dir", None, "Default WORKDIR/samples_<task>.", **kw)
    f.DEFINE_string("mask", "right", f"inpaint: {', '.join(MASKS)} or a .npy file (1 = known).",
                    **kw)
    f.DEFINE_enum("dataset", None, list(DATASETS), "Source images; default the checkpoint's.",
                  **kw)
    f.DEFINE_string("data_dir", None, "Image dataset folder; default the checkpoint's.", **kw)
    f.DEFINE_string("data_path", None, ".npy/.npz array of source samples.", **kw)
    f.DEFINE_enum("split", "test", list(SPLITS), "Split of the source images.", **kw)
    f.DEFINE_integer("num_interp", 8, "interpolate: frames per pair, endpoints included.",
                     lower_bound=2, **kw)
    f.DEFINE_integer("class_label", None, "Class to sample (-1: cycle through all).", **kw)
    f.DEFINE_enum("guidance", "none", list(GUIDANCE), "How --class_label steers sampling.",
                  **kw)
    f.DEFINE_float("guidance_scale", 1.0, "Guidance scale (cfg: w; classifier: gradient "
                   "weight).", **kw)
    f.DEFINE_string("classifier", None, "Noisy classifier checkpoint for --guidance "
                    "classifier.", **kw)
    f.DEFINE_boolean("progress", True, "Show a progress bar (on a terminal).", **kw)
    f.DEFINE_boolean("cuda_graph", False, "Replay the network from CUDA graphs (unconditional "
                     "fixed-step sampling on CUDA; no effect on the CPU).", **kw)


def _checked_run(fv) -> Dict[str, object]:
    for name in ("rtol", "atol"):
        if not getattr(fv, name) > 0:
            raise InputError(f"--{name} must be > 0, got {getattr(fv, name)}")
    if fv.eps is not None and not 0 < fv.eps < 1:
        raise InputError(f"--eps must lie in (0, 1), got {fv.eps}")
    _check_flag_use(fv)
    try:
        return run(fv)
    except (RuntimeError, MemoryError) as err:
        # A batch, or all the samples kept for the output, too large for the memory.
        if isinstance(err, MemoryError) or out_of_memory(err):
            raise InputError(f"out of memory ({str(err).strip().splitlines()[0]}): lower "
                             f"--batch_size (now {fv.batch_size}) or --num_samples (now "
                             f"{fv.num_samples})") from None
        # The samplers' non-finite state, or a failed ODE solve.
        if "non-finite" in str(err) or "tolerance" in str(err):
            raise FloatingPointError(str(err)) from None
        raise


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (see the module docstring)."""
    try:
        return run_tool(argv, __doc__, define_flags, _checked_run)
    except KeyboardInterrupt:  # while the flags are defined, before run_tool's own guard
        stderr_line("interrupted (SIGINT)")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
