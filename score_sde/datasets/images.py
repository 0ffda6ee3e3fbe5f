"""Image datasets read from local files, kept 8-bit: Fashion-MNIST (IDX files) and CIFAR-10 (the
python pickle batches). Nothing is downloaded; a missing file raises FileNotFoundError saying
how to get it."""
import gzip
import math
import os
import pickle
import zlib
from typing import List, Optional, Tuple

import numpy as np
import torch

from .common import NUM_LEVELS, DataInfo, check_labels, finish, reject_unused

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
# The folders that data_dir None reads, for the datasets that have one.
DEFAULT_DATA_DIRS = {"fashion_mnist": FASHION_MNIST_DIR}


def default_data_dir(name: str, data_dir: Optional[str] = None) -> Optional[str]:
    """`data_dir`, or where it is None, the default folder of dataset `name` (None if it has
    none)."""
    return DEFAULT_DATA_DIRS.get(name) if data_dir is None else data_dir

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
    # BadGzipFile is an OSError, truncation raises EOFError and a damaged stream zlib.error.
    except (OSError, EOFError, zlib.error) as e:
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


def load_fashion_mnist(*, split, data_dir, data_path, seed, num_samples):
    reject_unused("fashion_mnist", data_path=data_path)
    data_dir = default_data_dir("fashion_mnist", data_dir)
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
    check_labels(paths[1], labels, 10)
    x = torch.from_numpy(images).unsqueeze(1)
    return finish(x, torch.from_numpy(labels.astype(np.int64)), num_samples,
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
            AttributeError, ImportError, LookupError, OverflowError, MemoryError) as e:
        # A damaged file can declare absurd lengths (OverflowError, MemoryError) or an unknown
        # string encoding (LookupError).
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
    check_labels(path, labels, 10)
    return data, labels


def load_cifar10(*, split, data_dir, data_path, seed, num_samples):
    reject_unused("cifar10", data_path=data_path)
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
    return finish(x, y, num_samples,
                  DataInfo("cifar10", (3, 32, 32), True, NUM_LEVELS, (-1.0, 1.0), 10))


def image_files(name: str, data_dir: Optional[str]) -> List[str]:
    """The existing files of both splits that the loader of image dataset `name` reads from
    `data_dir` (None: the default folder, if the dataset has one)."""
    found: List[str] = []
    if name == "fashion_mnist":
        data_dir = default_data_dir(name, data_dir)
        for stems in _FASHION_FILES.values():
            found += [p for stem in stems if (p := _find_fashion_file(data_dir, stem))]
    elif name == "cifar10" and data_dir is not None:
        for folder in (data_dir, os.path.join(data_dir, _CIFAR_SUBDIR)):
            for names in _CIFAR_FILES.values():
                found += [p for n in names if os.path.isfile(p := os.path.join(folder, n))]
    return found
