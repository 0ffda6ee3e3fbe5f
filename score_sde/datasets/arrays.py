"""User data: a float array from an .npy or .npz file, used as is."""
import os
import tokenize
import zipfile
import zlib

import numpy as np
import torch

from .common import DataInfo, finish, reject_unused


# Preferred .npz keys, in order (samples: tools/sample.py's output); else its only array.
_ARRAY_KEYS = ("x", "data", "arr_0", "samples")
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
                    key = next((k for k in _ARRAY_KEYS if k in loaded.files), None)
                    if key is None and len(loaded.files) > 1:
                        raise ValueError(f"the archive holds the arrays {loaded.files} and "
                                         f"none is named {', '.join(_ARRAY_KEYS)}; save the "
                                         f"data as x (np.savez(path, x=data))")
                    loaded = loaded[key or loaded.files[0]]
    except PermissionError:
        raise  # not a damaged file: the tools report it as a file system failure
    # A damaged file can also fail in decompression (zlib), in parsing its header (tokenize,
    # SyntaxError) or by declaring a shape larger than memory.
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, tokenize.TokenError,
            SyntaxError, MemoryError) as e:
        raise ValueError(f"could not read {path} as a numeric array: {e}") from None
    return loaded


def load_array(*, split, data_dir, data_path, seed, num_samples):
    reject_unused("array", data_dir=data_dir)
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
    return finish(x, None, num_samples,
                  DataInfo("array", tuple(x.shape[1:]), False, None, None, None))
