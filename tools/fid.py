"""Fréchet distances between generated samples and a dataset split: FID and classifier FD.

Examples:
    python tools/fid.py --samples runs/vp_fashion_mnist/samples_generate/samples.npz \\
        --dataset fashion_mnist --split test --classifier runs/classifiers/fashion_clean.pt \\
        --output fd.json
    python tools/fid.py --samples samples.npz --dataset cifar10 --data_dir ~/data/cifar10 \\
        --split train --inception_weights ~/weights/inception-2015-12-05.pt \\
        --ref_stats refs/cifar10_train.npz

Run it from an install of the package (`pip install -e .`) or with PYTHONPATH set to the
repository root.

Samples. An .npz archive with the array "samples" (what tools/sample.py writes): uint8 images
[N, H, W] or [N, C, H, W], or floats in the model range [-1, 1] of the same shapes, which are
quantized to 8 bits with `score_sde.datasets.from_model_range` first (values outside [-1, 1]
saturate and are counted in "samples_clipped"; non-finite values are an error). Generated and
reference images thus pass through exactly the same 8-bit pipeline. --num_samples N keeps the
first N samples. They must have the per-sample shape of the dataset.

Reference. The --split of --dataset (fashion_mnist or cifar10, from --data_dir; default: the
dataset the classifier was trained on), its first --num_ref images (default all).

Feature spaces (at least one):
- --classifier PATH: the penultimate layer of a clean `FeatureClassifier` written by
  tools/train_classifier.py --kind clean, fed the images at the bin centres in [-1, 1].
  Reported as "classifier_fd": it depends on that network and is not FID.
- --inception_weights PATH: FID proper. PATH is the TorchScript Inception-v3 of the
  StyleGAN2-ADA / EDM metric code ("inception-2015-12-05.pt"), loaded with torch.jit.load and
  called as detector(x, return_features=True) on uint8 [B, 3, H, W] images (grayscale repeated
  to three channels; the network resizes to 299 itself), giving 2048 pool features. Nothing is
  ever downloaded: without the flag, "fid" is null and "fid_note" says why.
Each distance is `score_sde.metrics.frechet_distance` between the Gaussians fitted (float64,
unbiased covariance) to the two feature sets. It is biased upwards at small N (see
`score_sde.metrics`); compare values only at equal numbers of samples. The standard FID
protocol uses 50000 samples against the CIFAR-10 training set.

Reference cache. With --ref_stats FILE.npz the reference mean and covariance of each feature
space are read from FILE when they were computed from the same network file (SHA-256) and the
same reference images (SHA-256 of the uint8 data); otherwise they are computed and FILE is
rewritten (atomically), keeping its other entries. "ref_stats_status" says which happened.

Output. One JSON line on stdout and, with --output, the same object in a file: classifier_fd,
fid, fid_note, feature_spaces (per space: weights file, feature dimension), num_samples,
num_ref, dataset, split, samples, samples_dtype, samples_clipped, ref_stats,
ref_stats_status, notes (e.g. fewer samples than feature dimensions: singular covariance;
a regularised matrix square root), device, seconds.

Exit status: 0 done; 2 bad input (flags, missing or malformed files, keys, shapes), one line on
stderr; 3 numerical failure (no usable matrix square root); 4 a file that cannot be read or
written (no permission, a full disk), one line; 130 Ctrl-C, one line.
"""
import sys

try:  # Ctrl-C while torch loads (seconds) gives the one line it gives during the work
    import hashlib
    import os
    import time
    import warnings
    import zipfile
    import zlib
    from pathlib import Path
    from typing import Callable, Dict, List, Optional, Sequence, Tuple

    import numpy as np
    import torch

    from score_sde._utils import stderr_line
    from score_sde.cli import (EXIT_INTERRUPTED, InputError, check_distinct, check_not_data,
                               check_path, run_tool, sha256_file, write_json)
    from score_sde.classifier import FeatureClassifier, load_classifier
    from score_sde.datasets import SPLITS, from_model_range, load_dataset, to_model_range
    from score_sde.distributed import resolve_device
    from score_sde.metrics import feature_statistics, frechet_distance
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    sys.stderr.write("interrupted (SIGINT)\n")
    sys.exit(130)

DATASETS = ("fashion_mnist", "cifar10")
SAMPLES_KEY = "samples"
REF_STATS_SUFFIXES = ("_key", "_mu", "_cov")  # the arrays of each feature space in the cache
FID_NOTE = ("not computed: pass --inception_weights PATH (the TorchScript "
            "inception-2015-12-05.pt of the StyleGAN2-ADA metrics); nothing is downloaded")

Extractor = Callable[[torch.Tensor], torch.Tensor]  # uint8 [B, C, H, W] -> features [B, D]


# --- inputs -------------------------------------------------------------------------------------

def load_samples(path: Path, num_samples: Optional[int] = None
                 ) -> Tuple[torch.Tensor, str, int]:
    """(uint8 images [N, C, H, W], stored dtype, number of saturated float values) of the
    first `num_samples` samples (None: all).

    Raises:
        InputError: a missing or unreadable file, no "samples" array, or a bad dtype, shape
            or value.
    """
    if not path.is_file():
        raise InputError(f"--samples {path} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # EOFError: empty
        raise InputError(f"--samples {path} is not a readable .npz archive ({err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(f"--samples {path} is a plain .npy array; expected an .npz archive "
                         f"with the array {SAMPLES_KEY!r}")
    with archive:
        if SAMPLES_KEY not in archive.files:
            raise InputError(f"--samples {path} has no array {SAMPLES_KEY!r} (it has "
                             f"{', '.join(archive.files) or 'none'})")
        try:
            x = archive[SAMPLES_KEY]
        # Object arrays need pickle (ValueError); a damaged member fails its CRC or inflation.
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise InputError(f"--samples {path}: {SAMPLES_KEY!r} is unreadable ({err})") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or len(x) < 2:
        raise InputError(f"--samples {path}: {SAMPLES_KEY!r} must be images [N, H, W] or "
                         f"[N, C, H, W] with C in (1, 3) and N >= 2, got shape {x.shape}")
    x = x[:num_samples]
    clipped = 0
    if x.dtype == np.uint8:
        images = torch.from_numpy(x)
    elif x.dtype.type in (np.float16, np.float32, np.float64):
        x = x.astype(x.dtype.newbyteorder("="), copy=False)  # big-endian files are valid
        bad = int((~np.isfinite(x)).sum())
        if bad:
            raise InputError(f"--samples {path}: {bad} non-finite values in {SAMPLES_KEY!r}")
        clipped = int(((x < -1) | (x > 1)).sum())
        images = from_model_range(torch.from_numpy(x))
    else:
        raise InputError(f"--samples {path}: {SAMPLES_KEY!r} must be uint8 or floats "
                         f"(float16, float32 or float64) in [-1, 1], got dtype {x.dtype}")
    return images.contiguous(), str(x.dtype), clipped


def classifier_extractor(path: Path, device: torch.device
                         ) -> Tuple[Extractor, FeatureClassifier, Dict[str, object]]:
    """(features of bin-centred images in [-1, 1], the model, its meta) of a clean
    FeatureClassifier checkpoint."""
    if not path.is_file():
        raise InputError(f"--classifier {path} does not exist")
    model, meta = load_classifier(path, device)
    if not isinstance(model, FeatureClassifier):
        raise InputError(f"--classifier {path} is a {type(model).__name__}; the feature space "
                         f"needs a clean FeatureClassifier (train_classifier.py --kind clean)")
    return lambda x: model.features(to_model_range(x, dequantize=False)), model, meta


def inception_extractor(path: Path, device: torch.device) -> Extractor:
    """The TorchScript Inception-v3 of the StyleGAN2-ADA metrics on uint8 RGB images."""
    if not path.is_file():
        raise InputError(f"--inception_weights {path} does not exist (nothing is downloaded)")
    try:
        detector = torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as err:
        raise InputError(f"--inception_weights {path} is not a TorchScript file "
                         f"({str(err).splitlines()[0]})") from None

    def extract(x: torch.Tensor) -> torch.Tensor:
        rgb = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        try:
            return detector(rgb.contiguous(), return_features=True)
        except (torch.jit.Error, RuntimeError) as err:  # a wrong network fails here
            raise InputError(f"--inception_weights {path} failed on uint8 images "
                             f"{tuple(rgb.shape)}: {str(err).strip().splitlines()[-1]}") from None

    return extract


def extract_features(extract: Extractor, images: torch.Tensor, *, batch_size: int,
                     device: torch.device, name: str) -> np.ndarray:
    """Features [N, D] (float64) of uint8 images [N, C, H, W], in batches."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            feats = extract(images[start:start + batch_size].to(device))
            if not isinstance(feats, torch.Tensor) or feats.ndim != 2 \
                    or feats.shape[0] != min(batch_size, len(images) - start):
                got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats)
                raise InputError(f"the {name} network must return features [B, D], got {got}")
            out.append(feats.double().cpu().numpy())
    return np.concatenate(out)


# --- reference statistics cache -----------------------------------------------------------------

def read_ref_stats(path: Optional[Path]) -> Dict[str, np.ndarray]:
    """The cached arrays of --ref_stats ({} for none yet).

    Raises:
        InputError: an unreadable file, or one that holds anything but this cache's arrays
            (another file given by mistake, which the cache must not rewrite)."""
    if path is None or not path.exists():
        return {}
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("a plain .npy array")
        with loaded as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise InputError(f"--ref_stats {path} is not a readable .npz archive ({err}); delete "
                         f"it or pass another path") from None
    foreign = [k for k in arrays if not k.endswith(REF_STATS_SUFFIXES)]
    if foreign:
        raise InputError(f"--ref_stats {path} holds arrays that are not reference statistics "
                         f"({', '.join(foreign[:3])}); pass a file of its own")
    return arrays


def write_ref_stats(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- command line -------------------------------------------------------------------------------

def define_flags(fv) -> None:
    """Defines the tool's flags on the absl FlagValues `fv`."""
    from absl import flags

    f, kw = flags, dict(flag_values=fv)
    f.DEFINE_string("samples", None, ".npz with the array 'samples' (uint8 or [-1, 1]).", **kw)
    f.DEFINE_enum("dataset", None, list(DATASETS), "Reference dataset; default: the "
                  "classifier's.", **kw)
    f.DEFINE_string("data_dir", None, "Dataset folder; default: the loader's.", **kw)
    f.DEFINE_enum("split", "test", list(SPLITS), "Reference split.", **kw)
    f.DEFINE_integer("num_samples", None, "Use the first N samples; default all.",
                     lower_bound=2, **kw)
    f.DEFINE_integer("num_ref", None, "Use the first N reference images; default all.",
                     lower_bound=2, **kw)
    f.DEFINE_string("classifier", None, "FeatureClassifier checkpoint (classifier_fd).", **kw)
    f.DEFINE_string("inception_weights", None, "TorchScript inception-2015-12-05.pt (fid).",
                    **kw)
    f.DEFINE_string("ref_stats", None, "Cache of the reference statistics (.npz).", **kw)
    f.DEFINE_integer("batch_size", 250, "Images per network call.", lower_bound=1, **kw)
    f.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "auto: CUDA if available.", **kw)
    f.DEFINE_string("output", None, "Also write the result JSON to this file.", **kw)
    flags.mark_flag_as_required("samples", flag_values=fv)


def run(fv) -> Dict[str, object]:
    """Computes the distances with parsed flags; returns the result.

    Raises:
        InputError, ValueError, FileNotFoundError, CheckpointError: bad input.
        FloatingPointError: no usable matrix square root.
    """
    wall = time.time()
    if fv.classifier is None and fv.inception_weights is None:
        raise InputError("nothing to compute: pass --classifier PATH and/or "
                         "--inception_weights PATH")
    device = resolve_device(fv.device)
    samples_path = Path(fv.samples)
    if fv.output:  # checked now, not after the features are computed
        check_path("output", Path(fv.output))
    check_distinct({"samples": fv.samples, "classifier": fv.classifier,
                    "inception_weights": fv.inception_weights, "ref_stats": fv.ref_stats,
                    "output": fv.output})
    samples, samples_dtype, clipped = load_samples(samples_path, fv.num_samples)

    dataset = fv.dataset
    spaces: Dict[str, Tuple[Path, Extractor]] = {}
    if fv.classifier is not None:
        path = Path(fv.classifier)
        extract, model, meta = classifier_extractor(path, device)
        if model.in_channels != samples.shape[1]:
            raise InputError(f"--classifier {path} reads {model.in_channels}-channel images, "
                             f"the samples have {samples.shape[1]}")
        dataset = dataset or meta.get("dataset")
        spaces["classifier"] = (path, extract)
    if fv.inception_weights is not None:
        path = Path(fv.inception_weights)
        spaces["inception"] = (path, inception_extractor(path, device))
    if dataset is None:
        raise InputError("--dataset is needed (no --classifier checkpoint names one)")
    check_not_data({"output": fv.output, "ref_stats": fv.ref_stats}, dataset,
                   data_dir=fv.data_dir)

    ref_ds, info = load_dataset(dataset, split=fv.split, data_dir=fv.data_dir,
                                num_samples=fv.num_ref)
    ref = ref_ds.tensors[0]
    if tuple(samples.shape[1:]) != tuple(info.shape):
        raise InputError(f"samples of shape {tuple(samples.shape[1:])} do not match the "
                         f"{dataset} images {tuple(info.shape)}")
    ref_hash = hashlib.sha256(ref.numpy().tobytes()).hexdigest()

    ref_stats_path = check_path("ref_stats", Path(fv.ref_stats)) if fv.ref_stats else None
    cache = read_ref_stats(ref_stats_path)
    status: Dict[str, str] = {}
    distances: Dict[str, float] = {}
    dims: Dict[str, int] = {}
    notes: List[str] = []
    for name, (path, extract) in spaces.items():
        key = f"{sha256_file(path)}:{ref_hash}:{len(ref)}"
        cached = str(cache[f"{name}_key"]) if f"{name}_key" in cache else None
        if cached == key:
            mu_ref, cov_ref = cache[f"{name}_mu"], cache[f"{name}_cov"]
            status[name] = "loaded"
        else:
            feats = extract_features(extract, ref, batch_size=fv.batch_size, device=device,
                                     name=name)
            mu_ref, cov_ref = feature_statistics(feats)
            cache.update({f"{name}_key": np.array(key), f"{name}_mu": mu_ref,
                          f"{name}_cov": cov_ref})
            status[name] = "computed" if ref_stats_path is not None else "not cached"
            if ref_stats_path is not None and cached is not None:
                status[name] = "recomputed (network or reference data changed)"
        feats = extract_features(extract, samples, batch_size=fv.batch_size, device=device,
                                 name=name)
        mu, cov = feature_statistics(feats)
        if mu.shape != mu_ref.shape:
            raise InputError(f"{name}: {mu.shape[0]} sample features but {mu_ref.shape[0]} "
                             f"reference features")
        dims[name] = int(mu.shape[0])
        if min(len(samples), len(ref)) <= dims[name]:
            notes.append(f"{name}: at most {min(len(samples), len(ref))} images for "
                         f"{dims[name]} features: the covariance is singular and the "
                         f"distance strongly biased")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            distances[name] = frechet_distance(mu, cov, mu_ref, cov_ref)
        notes += [f"{name}: {w.message}" for w in caught]
    if ref_stats_path is not None and any(s != "loaded" for s in status.values()):
        write_ref_stats(ref_stats_path, cache)

    return {
        "classifier_fd": distances.get("classifier"), "fid": distances.get("inception"),
        "fid_note": None if "inception" in spaces else FID_NOTE,
        "feature_spaces": {name: {"weights": str(path), "dim": dims[name]}
                           for name, (path, _) in spaces.items()},
        "num_samples": len(samples), "num_ref": len(ref), "dataset": dataset,
        "split": fv.split, "data_dir": fv.data_dir, "samples": str(samples_path),
        "samples_dtype": samples_dtype, "samples_clipped": clipped,
        "ref_stats": str(ref_stats_path) if ref_stats_path else None,
        "ref_stats_status": status, "notes": notes, "device": str(device),
        "seconds": time.time() - wall}


def _run_and_write(fv) -> Dict[str, object]:
    result = run(fv)
    if fv.output:
        write_json(Path(fv.output), result)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (see the module docstring)."""
    try:
        return run_tool(argv, __doc__, define_flags, _run_and_write)
    except KeyboardInterrupt:  # while the flags are defined, before run_tool's own guard
        stderr_line("interrupted (SIGINT)")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
