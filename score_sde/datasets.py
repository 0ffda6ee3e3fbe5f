"""Training data: Fashion-MNIST, CIFAR-10, user arrays and 2-D toys, plus a resumable batch order.

`load_dataset(name, ...)` returns a `TensorDataset` and a `DataInfo`. Image datasets stay 8-bit
(uint8 [N, C, H, W] and int64 labels [N]) until `to_model_range` dequantizes a batch to [-1, 1)
(Song et al. 2021, Sec. 4.3: bits/dim on uniformly dequantized data); the interval has width 2,
so `score_sde.likelihood.bits_per_dim` adds log2(256) - log2(2) = 7 bits. Continuous data
(arrays and toys) is used as is. The 2-D toys follow FFJORD (Grathwohl et al. 2019,
`lib/toy_data.py`): 8 Gaussians, checkerboard, swiss roll, two moons.

`BatchOrder` makes the sample order a pure function of (seed, step), so training resumes exactly
without saving sampler state and DDP ranks see disjoint shards of the single-process batch.
"""
import gzip
import math
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ._utils import check_choice, check_int

SPLITS = ("train", "test")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
NUM_LEVELS = 256  # levels of 8-bit image data
TOY_NUM_SAMPLES = {"train": 100_000, "test": 10_000}
# Independent random streams derived from the user's seed (see `mix_seed`).
_TOY_STREAM, _ORDER_STREAM = 1, 2


@dataclass(frozen=True)
class DataInfo:
    """What a training loop needs to know about a dataset's samples."""

    name: str  # key in DATASETS (converted runs: the reference's dataset, e.g. "ffhq")
    shape: Tuple[int, ...]  # per-sample shape, e.g. (1, 28, 28) or (2,)
    discrete: bool  # True: 8-bit data stored as uint8, pass batches through to_model_range
    num_levels: Optional[int]  # discrete levels (256) for bits_per_dim; None if continuous
    data_range: Optional[Tuple[float, float]]  # interval the model sees; None: used as is
    num_classes: Optional[int]  # number of labels; None if unlabelled

    @property
    def num_dims(self) -> int:
        """Dimensions per sample D (the `num_dims` of bits_per_dim)."""
        return math.prod(self.shape)


# --- IDX (Fashion-MNIST) ------------------------------------------------------------------------

# IDX type codes (third magic byte) -> big-endian numpy dtype (LeCun's MNIST page, "IDX format").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_bytes(path: str) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; truncation raises EOFError
        raise ValueError(f"{path}: corrupt gzip data ({e})") from None


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (plain or gzip-compressed) into a native-endian numpy array.

    The format: magic bytes 0x00 0x00, a type code (0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64) and the rank r; then r big-endian uint32 dims; then
    the big-endian data, row-major. Images are 0x00000803, labels 0x00000801.

    Args:
        path: the file; gzip is detected from its first bytes, not its name.

    Returns:
        array of the stored dtype (native byte order) and shape.

    Raises:
        ValueError: bad magic bytes, unknown type code, rank 0, or a data size that does not
            match the header (truncated file or trailing bytes).
    """
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] < 1:
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4].hex() or 'missing'}); "
                         f"expected 0000 + type code in "
                         f"{[f'{c:02x}' for c in _IDX_DTYPES]} + rank >= 1")
    dtype, rank = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * rank
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=rank, offset=4))
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        problem = "truncated" if len(raw) - header < expected else "trailing bytes"
        raise ValueError(f"{path}: IDX data has {len(raw) - header} bytes but header dims {dims} "
                         f"need {expected} ({problem})")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def _find_fashion_file(data_dir: str, stem: str) -> Optional[str]:
    for name in (stem + ".gz", stem):
        if os.path.isfile(os.path.join(data_dir, name)):
            return os.path.join(data_dir, name)
    return None


def _load_fashion_mnist(*, split, data_dir, data_path, seed, num_samples):
    _reject_unused("fashion_mnist", data_path=data_path)
    data_dir = FASHION_MNIST_DIR if data_dir is None else data_dir
    how = ("install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist, "
           f"files in {FASHION_MNIST_DIR}) or pass data_dir (--data_dir)")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"Fashion-MNIST not found: {data_dir} is not a directory; {how}")
    paths = [_find_fashion_file(data_dir, stem) for stem in _FASHION_FILES[split]]
    missing = [stem for stem, p in zip(_FASHION_FILES[split], paths) if p is None]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found in {data_dir}: missing "
                                f"{', '.join(s + '[.gz]' for s in missing)}; {how}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28) \
            or not len(images):
        raise ValueError(f"{paths[0]}: expected uint8 images [N, 28, 28] with N >= 1, got "
                         f"{images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise ValueError(f"{paths[1]}: expected uint8 labels [{images.shape[0]}] to match "
                         f"{paths[0]}, got {labels.dtype} {labels.shape}")
    _check_labels(paths[1], labels, 10)
    x = torch.from_numpy(images).unsqueeze(1)
    return _finish(x, torch.from_numpy(labels.astype(np.int64)), num_samples,
                   DataInfo("fashion_mnist", (1, 28, 28), True, NUM_LEVELS, (-1.0, 1.0), 10))


# --- CIFAR-10 python batches --------------------------------------------------------------------

_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_CIFAR_SUBDIR = "cifar-10-batches-py"
# The only globals a CIFAR batch pickle needs (Python 2 and 3 numpy arrays, bytes in protocol 2);
# anything else could run arbitrary code, so it is refused.
_PICKLE_GLOBALS = {("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype")} | {
    (f"numpy.{core}.{mod}", name) for core in ("core", "_core")
    for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                      ("numeric", "_frombuffer"))}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # renamed in numpy 2
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _read_cifar_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, ImportError) as e:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    get = (lambda k: batch.get(k.encode(), batch.get(k))) if isinstance(batch, dict) else None
    data, labels = (get("data"), get("labels")) if get else (None, None)
    if not isinstance(data, np.ndarray) or labels is None:
        raise ValueError(f"{path}: expected a pickled dict with b'data' and b'labels'")
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: expected uint8 data [n, 3072], got {data.dtype} {data.shape}")
    if labels.shape != data.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: expected {data.shape[0]} integer labels, got "
                         f"{labels.dtype} {labels.shape}")
    _check_labels(path, labels, 10)
    return data, labels


def _load_cifar10(*, split, data_dir, data_path, seed, num_samples):
    _reject_unused("cifar10", data_path=data_path)
    how = ("download the CIFAR-10 python version (cifar-10-python.tar.gz, "
           "https://www.cs.toronto.edu/~kriz/cifar.html), extract it and pass data_dir "
           "(--data_dir) = the folder holding data_batch_1..5 and test_batch or "
           f"{_CIFAR_SUBDIR}/")
    if data_dir is None:
        raise FileNotFoundError(f"CIFAR-10 has no default location; {how}")
    names = _CIFAR_FILES[split]
    base = data_dir
    if not os.path.isfile(os.path.join(base, names[0])):
        base = os.path.join(data_dir, _CIFAR_SUBDIR)
    missing = [n for n in names if not os.path.isfile(os.path.join(base, n))]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 not found in {data_dir} (or {_CIFAR_SUBDIR}/ "
                                f"inside it): missing {', '.join(missing)}; {how}")
    batches = [_read_cifar_batch(os.path.join(base, n)) for n in names]
    # Rows are channel-major: pixel [c, y, x] = row[c * 1024 + y * 32 + x].
    x = torch.from_numpy(np.concatenate([d for d, _ in batches]).reshape(-1, 3, 32, 32))
    y = torch.from_numpy(np.concatenate([lab for _, lab in batches]).astype(np.int64))
    return _finish(x, y, num_samples,
                   DataInfo("cifar10", (3, 32, 32), True, NUM_LEVELS, (-1.0, 1.0), 10))


# --- user arrays --------------------------------------------------------------------------------

_ARRAY_KEYS = ("x", "data", "arr_0")  # preferred .npz keys, in order; else the first array
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def _read_array(path: str) -> np.ndarray:
    if not path.endswith((".npy", ".npz")):
        raise ValueError(f"data_path must end in .npy or .npz, got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data_path {path!r} does not exist")
    try:
        # Our own handle: np.load leaks its file when a damaged .npz fails to open.
        with open(path, "rb") as f:
            loaded = np.load(f, allow_pickle=False)
            if not isinstance(loaded, np.ndarray):  # an .npz archive, read lazily
                with loaded:
                    if not loaded.files:
                        raise ValueError("the archive holds no arrays")
                    loaded = loaded[next((k for k in _ARRAY_KEYS if k in loaded.files),
                                         loaded.files[0])]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"could not read {path} as a numeric array: {e}") from None
    return loaded


def _load_array(*, split, data_dir, data_path, seed, num_samples):
    _reject_unused("array", data_dir=data_dir)
    if data_path is None:
        raise ValueError("dataset 'array' needs data_path (--data_path), a .npy or .npz file")
    arr = _read_array(os.fspath(data_path))
    if arr.dtype.type not in _FLOAT_DTYPES:
        raise ValueError(f"{data_path}: array dtype {arr.dtype} is not supported; expected "
                         "float16, float32 or float64 (e.g. x.astype(np.float32))")
    if arr.ndim < 2 or arr.size == 0:
        raise ValueError(f"{data_path}: array of shape {arr.shape} must be [N, D, ...] with "
                         "rank >= 2 and no empty dimension (reshape 1-D data to [N, 1])")
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.unravel_index(np.argmax(bad), arr.shape))
        raise ValueError(f"{data_path}: array has {int(np.isnan(arr).sum())} NaN and "
                         f"{int(np.isinf(arr).sum())} inf values; first at index {first}")
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("=")))
    return _finish(x, None, num_samples,
                   DataInfo("array", tuple(x.shape[1:]), False, None, None, None))


# --- 2-D toys -----------------------------------------------------------------------------------

_GAUSS_RADIUS = 2.0 * math.sqrt(2.0)  # FFJORD: unit-circle centres * 4 / 1.414
_GAUSS_STD = 0.5 / math.sqrt(2.0)  # FFJORD: 0.5 / 1.414
_LOG_CHECKER_DENSITY = -math.log(32.0)  # 8 cells of area 4, uniform


def _gaussian_centres(dtype, device=None) -> torch.Tensor:
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    centres = _GAUSS_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)
    return centres.to(dtype=dtype, device=device)


def _sample_8gaussians(n, g):
    k = torch.randint(8, (n,), generator=g)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float32)
    return _gaussian_centres(torch.float32)[k] + _GAUSS_STD * noise


def _checker_cells() -> torch.Tensor:
    # Cells [2i, 2i + 2) x [2j, 2j + 2) of [-4, 4)^2 with i + j even (FFJORD's checkerboard).
    ij = torch.cartesian_prod(torch.arange(-2, 2), torch.arange(-2, 2))
    return ij[ij.sum(dim=1) % 2 == 0]


def _sample_checkerboard(n, g):
    cells = _checker_cells()[torch.randint(8, (n,), generator=g)]
    return 2.0 * (cells + torch.rand(n, 2, generator=g, dtype=torch.float32))


def _sample_swissroll(n, g):
    # sklearn make_swiss_roll(noise=1.0), coordinates (x, z), divided by 5, as in FFJORD.
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float32))
    x = torch.stack([t * t.cos(), t * t.sin()], dim=1)
    x = x + torch.randn(n, 2, generator=g, dtype=torch.float32)
    return x / 5


def _sample_moons(n, g):
    # sklearn make_moons(noise=0.1) with uniform random angles, then * 2 + (-1, -0.2) (FFJORD).
    theta = math.pi * torch.rand(n, generator=g, dtype=torch.float32)
    upper = torch.stack([theta.cos(), theta.sin()], dim=1)
    lower = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], dim=1)
    x = torch.where(torch.rand(n, 1, generator=g) < 0.5, upper, lower)
    x = x + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float32)
    return 2 * x + torch.tensor([-1.0, -0.2], dtype=torch.float32)


_TOY_SAMPLERS = {"toy_8gaussians": _sample_8gaussians, "toy_checkerboard": _sample_checkerboard,
                 "toy_swissroll": _sample_swissroll, "toy_moons": _sample_moons}


def _log_prob_8gaussians(x):
    d2 = ((x[:, None, :] - _gaussian_centres(x.dtype, x.device)) ** 2).sum(dim=-1)  # [B, 8]
    return (torch.logsumexp(-0.5 * d2 / _GAUSS_STD ** 2, dim=1)
            - math.log(8) - math.log(2 * math.pi * _GAUSS_STD ** 2))


def _log_prob_checkerboard(x):
    cell = torch.floor(x / 2)
    inside = ((cell >= -2) & (cell <= 1)).all(dim=1) & (cell.sum(dim=1) % 2 == 0)
    return torch.full_like(x[:, 0], _LOG_CHECKER_DENSITY).masked_fill(~inside, -math.inf)


TOY_LOG_PROBS = {"toy_8gaussians": _log_prob_8gaussians,
                 "toy_checkerboard": _log_prob_checkerboard}


def toy_log_prob(name: str, x: torch.Tensor) -> torch.Tensor:
    """Exact log-density of a 2-D toy whose density has a closed form.

    8 Gaussians: (1/8) sum_k N(x; c_k, s^2 I) with c_k = 2 sqrt(2) (cos k pi/4, sin k pi/4),
    s = 0.5 / sqrt(2) (differentiable). Checkerboard: 1/32 on the 8 cells [2i, 2i+2) x [2j, 2j+2)
    of [-4, 4)^2 with i + j even, -inf elsewhere. The swiss roll and moons have none.

    Args:
        name: a key of TOY_LOG_PROBS.
        x: points [B, 2], floating point.

    Returns:
        log p(x) in nats, shape [B], x's dtype and device.

    Raises:
        ValueError: unknown name or x not a floating tensor [B, 2].
    """
    check_choice("toy with an exact log-density", name, TOY_LOG_PROBS)
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != 2 \
            or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor [B, 2], got {got}")
    return TOY_LOG_PROBS[name](x)


def _load_toy(name, *, split, data_dir, data_path, seed, num_samples):
    _reject_unused(name, data_dir=data_dir, data_path=data_path)
    n = TOY_NUM_SAMPLES[split] if num_samples is None else num_samples
    g = torch.Generator().manual_seed(mix_seed(seed, _TOY_STREAM, SPLITS.index(split)))
    x = _TOY_SAMPLERS[name](n, g).to(torch.float32)
    return TensorDataset(x), DataInfo(name, (2,), False, None, None, None)


# --- shared helpers and the entry point ---------------------------------------------------------

def mix_seed(*values: int) -> int:
    """A well-mixed 64-bit seed from small ints: (seed, epoch) and (seed + 1, epoch - 1) differ."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0])


def _reject_unused(name: str, **args) -> None:
    for arg, value in args.items():
        if value is not None:
            raise ValueError(f"dataset {name!r} does not use {arg} (got {value!r}); "
                             "data_dir is for fashion_mnist / cifar10, data_path for array")


def _check_labels(path: str, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels must lie in 0..{num_classes - 1}, got range "
                         f"{labels.min()}..{labels.max()}")


def _finish(x, y, num_samples, info):
    if num_samples is not None:
        x, y = x[:num_samples], None if y is None else y[:num_samples]
    return (TensorDataset(x) if y is None else TensorDataset(x, y)), info


DATASETS: Dict[str, Callable[..., Tuple[TensorDataset, DataInfo]]] = {
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "array": _load_array,
    **{name: partial(_load_toy, name) for name in _TOY_SAMPLERS},
}


def load_dataset(name: str, *, split: str = "train", data_dir: Optional[str] = None,
                 data_path: Optional[str] = None, seed: int = 0,
                 num_samples: Optional[int] = None) -> Tuple[TensorDataset, DataInfo]:
    """Loads a dataset by name into memory; nothing is ever downloaded.

    - "fashion_mnist": IDX files (train-/t10k-images-idx3-ubyte, -labels-idx1-ubyte, plain or
      .gz) from `data_dir` (default /usr/share/datasets/fashion-mnist, Debian's
      dataset-fashion-mnist). 60000 train / 10000 test images.
    - "cifar10": the python pickle batches data_batch_1..5 (train) and test_batch (test) from
      `data_dir` or its cifar-10-batches-py/ subfolder. 50000 / 10000 images.
    - "array": a float .npy, or the array "x", "data" or "arr_0" (first found; otherwise the
      archive's first array) of an .npz, at `data_path`. The same file serves every split;
      hold data out yourself for evaluation.
    - "toy_8gaussians", "toy_checkerboard", "toy_swissroll", "toy_moons": `num_samples` 2-D
      points (default 100000 train / 10000 test) drawn with a generator seeded by (`seed`,
      `split`), so splits differ and every call with the same arguments returns the same data.

    Args:
        name: a key of DATASETS.
        split: "train" or "test".
        data_dir: folder of an image dataset (image datasets only).
        data_path: .npy / .npz file (dataset "array" only).
        seed: integer >= 0 seeding the toys; file datasets are deterministic and ignore it.
        num_samples: toys: number of points; file datasets: keep the first `num_samples` items
            (all if there are fewer). None: the default size.

    Returns:
        (dataset, info). Image datasets: TensorDataset(images uint8 [N, C, H, W], labels int64
        [N]); map batches to the model's range with `to_model_range`. Arrays:
        TensorDataset(x [N, ...]) in the file's float dtype. Toys: TensorDataset(x float32
        [N, 2]). `info` describes one sample (DataInfo).

    Raises:
        ValueError: unknown name or split, invalid seed / num_samples, an argument the dataset
            does not use, or a malformed file (the message names the file and the problem).
        FileNotFoundError: the data is missing (the message says how to get it).
    """
    check_choice("dataset", name, DATASETS)
    check_choice("split", split, SPLITS)
    check_int("seed", seed, minimum=0)
    if num_samples is not None:
        check_int("num_samples", num_samples, minimum=1)
    return DATASETS[name](split=split, data_dir=data_dir, data_path=data_path, seed=seed,
                          num_samples=num_samples)


# --- 8-bit images <-> model range ---------------------------------------------------------------

def to_model_range(x: torch.Tensor, *, generator: Optional[torch.Generator] = None,
                   dequantize: bool = True, dtype: torch.dtype = torch.float32,
                   data_range: Tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Maps 8-bit data k in {0, ..., 255} to [lo, hi): y = lo + (k + u) / 256 (hi - lo).

    With `dequantize`, u ~ Uniform[0, 1) independently per element (uniform dequantization, the
    continuous density of y bounds the discrete likelihood); otherwise u = 0.5, the bin centre.
    The default interval [-1, 1] has width 2, so bits/dim of y take the offset 8 - 1 = 7 bits
    of `score_sde.likelihood.bits_per_dim(logp, D, data_width=2.0, num_levels=256)`; the
    paper's VE models read [0, 1] (width 1, offset 8).

    Args:
        x: uint8 tensor of any shape.
        generator: source of the dequantization noise (on x's device); None: global RNG.
        dequantize: add uniform noise (training, likelihood) or use bin centres (display).
        dtype: floating dtype of the result.
        data_range: the interval (lo, hi) the model reads, `DataInfo.data_range`.

    Returns:
        tensor of x's shape in `dtype`, values in [lo, hi).

    Raises:
        ValueError: x is not a uint8 tensor, dtype is not floating point, or lo >= hi.
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a uint8 tensor of 8-bit data, got {got}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    lo, hi = _check_range(data_range)
    work = torch.promote_types(dtype, torch.float32)  # 255 + u needs float32's mantissa
    if dequantize:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=work)
    else:
        u = torch.full(x.shape, 0.5, device=x.device, dtype=work)
    y = ((x.to(work) + u) * ((hi - lo) / NUM_LEVELS) + lo).to(dtype)
    # 255 + u rounds up to 256 for u within half an ulp of 1; keep the documented [lo, hi).
    below_hi = torch.nextafter(torch.tensor(hi, dtype=dtype), torch.tensor(lo, dtype=dtype))
    return y.clamp_(max=below_hi.item())


def _check_range(data_range) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(f"data_range must be a pair (lo, hi), got {data_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"data_range must be finite with lo < hi, got {data_range!r}")
    return lo, hi


def from_model_range(x: torch.Tensor,
                     data_range: Tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Inverse of `to_model_range`: k = floor((x - lo) / (hi - lo) * 256) clamped to
    {0, ..., 255}.

    Each dequantization bin lo + [k, k + 1) (hi - lo) / 256 maps back to k, so bin centres and
    dequantized values round-trip exactly; values outside [lo, hi) saturate. NaN maps to 0 with
    a warning.

    Args:
        x: floating tensor of any shape (e.g. model samples [B, C, H, W]).
        data_range: the interval (lo, hi) the model reads, `DataInfo.data_range`.

    Returns:
        uint8 tensor of x's shape, for saving images.

    Raises:
        ValueError: x is not a floating-point tensor, or lo >= hi.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor, got {got}")
    lo, hi = _check_range(data_range)
    num_nan = int(torch.isnan(x).sum())
    if num_nan:
        warnings.warn(f"from_model_range: {num_nan} NaN values mapped to 0")
        x = torch.nan_to_num(x, nan=lo)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    k = torch.floor((x - lo) * (NUM_LEVELS / (hi - lo)))
    return k.clamp_(0, NUM_LEVELS - 1).to(torch.uint8)


# --- resumable batch order ----------------------------------------------------------------------

class BatchOrder:
    """Deterministic, stateless order of training batches: indices are a function of the step.

    Epoch e is a permutation torch.randperm(num_items) drawn from a generator seeded by
    (seed, e) (well mixed, so nearby seeds give unrelated orders). Global step s belongs to epoch
    s // steps_per_epoch and takes slice j = s % steps_per_epoch of it: perm[j*B : (j+1)*B].
    With drop_last, steps_per_epoch = num_items // B and the last num_items % B items of each
    permutation are skipped that epoch. Without it, steps_per_epoch = ceil(num_items / B) and
    the last batch wraps around to the start of the same permutation, so every batch is full.
    Rank r of world_size takes the contiguous shard [r*b, (r+1)*b), b = B / world_size, of the
    global batch: the ranks' shards concatenated in rank order are the single-process batch.
    Resuming at step k needs only (seed, k); the permutation depends on torch's randperm, so
    exact resumption assumes the same torch version.

    Args:
        num_items: dataset size N >= 1.
        batch_size: global batch size B, 1 <= B <= N, divisible by world_size.
        seed: integer >= 0.
        drop_last: skip the incomplete tail of each epoch instead of wrapping around.
        rank: this process's rank, 0 <= rank < world_size.
        world_size: number of data-parallel processes.

    Raises:
        ValueError: any argument outside the ranges above.
    """

    def __init__(self, num_items: int, batch_size: int, *, seed: int, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1):
        check_int("num_items", num_items, minimum=1)
        check_int("batch_size", batch_size, minimum=1)
        check_int("seed", seed, minimum=0)
        check_int("world_size", world_size, minimum=1)
        check_int("rank", rank, minimum=0)
        if batch_size > num_items:
            raise ValueError(f"batch_size must be <= num_items={num_items}, got {batch_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size must be divisible by world_size={world_size}, "
                             f"got {batch_size}")
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.local_batch_size = batch_size // world_size
        self.steps_per_epoch = (num_items // batch_size if drop_last
                                else -(-num_items // batch_size))
        self._cache: Tuple[int, Optional[torch.Tensor]] = (-1, None)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of all items in `epoch` (int64 [num_items])."""
        check_int("epoch", epoch, minimum=0)
        if self._cache[0] != epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, _ORDER_STREAM, epoch))
            self._cache = (epoch, torch.randperm(self.num_items, generator=g))
        return self._cache[1]

    def global_indices(self, step: int) -> torch.Tensor:
        """Indices of the whole batch of global step `step` (0-based), int64 [batch_size]."""
        check_int("step", step, minimum=0)
        epoch, j = divmod(step, self.steps_per_epoch)
        start = j * self.batch_size
        positions = torch.arange(start, start + self.batch_size) % self.num_items
        return self.permutation(epoch)[positions]

    def indices(self, step: int) -> torch.Tensor:
        """This rank's indices for global step `step`, int64 [batch_size // world_size]."""
        b = self.local_batch_size
        return self.global_indices(step)[self.rank * b:(self.rank + 1) * b]
