"""Training data: Fashion-MNIST, CIFAR-10, user arrays and 2-D toys, plus a resumable batch order.

`load_dataset(name, ...)` returns a `TensorDataset` and a `DataInfo`. Image datasets stay 8-bit
(uint8 [N, C, H, W] and int64 labels [N]) until `to_model_range` dequantizes a batch to [-1, 1)
(Song et al. 2021, Sec. 4.3: bits/dim on uniformly dequantized data); the interval has width 2,
so `score_sde.likelihood.bits_per_dim` adds log2(256) - log2(2) = 7 bits. Continuous data
(arrays and toys) is used as is. The 2-D toys follow FFJORD (Grathwohl et al. 2019,
`lib/toy_data.py`): 8 Gaussians, checkerboard, swiss roll, two moons.

`BatchOrder` makes the sample order a pure function of (seed, step), so training resumes exactly
without saving sampler state and DDP ranks see disjoint shards of the single-process batch.

One concern per module: `images` (Fashion-MNIST, CIFAR-10), `arrays` (.npy / .npz files),
`toys` (2-D densities), `scaling` (8-bit data <-> model range), `batching` (`BatchOrder`),
`common` (`DataInfo` and what the loaders share). This module holds the table of loaders
and re-exports the public names.
"""
import os
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

from torch.utils.data import TensorDataset

from .._utils import check_choice, check_int
from .arrays import load_array
from .batching import BatchOrder
from .common import NUM_LEVELS, SPLITS, DataInfo, mix_seed
from .images import (FASHION_MNIST_DIR, image_files, load_cifar10, load_fashion_mnist,
                     read_idx)
from .scaling import from_model_range, to_model_range
from .toys import TOY_LOG_PROBS, TOY_NUM_SAMPLES, TOY_SAMPLERS, load_toy, toy_log_prob

__all__ = ["DATASETS", "load_dataset", "dataset_files", "DataInfo", "SPLITS", "NUM_LEVELS",
           "FASHION_MNIST_DIR", "TOY_NUM_SAMPLES", "TOY_LOG_PROBS", "toy_log_prob", "read_idx",
           "to_model_range", "from_model_range", "BatchOrder", "mix_seed"]

DATASETS: Dict[str, Callable[..., Tuple[TensorDataset, DataInfo]]] = {
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "array": load_array,
    **{name: partial(load_toy, name) for name in TOY_SAMPLERS},
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
    - "array": a float .npy, or the array "x", "data", "arr_0" or "samples" (first found;
      otherwise the archive's only array: several others are refused) of an .npz, at
      `data_path`. The same file serves every split;
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


def dataset_files(name: str, *, data_dir: Optional[str] = None,
                  data_path: Optional[str] = None) -> List[str]:
    """The existing files `load_dataset(name, ...)` reads for either split, as real absolute
    paths, so that tools can refuse to write over their own data; [] for the toys.

    Raises:
        ValueError: unknown name.
    """
    check_choice("dataset", name, DATASETS)
    files = image_files(name, data_dir)
    if name == "array" and data_path is not None and os.path.isfile(data_path):
        files.append(data_path)
    return [os.path.realpath(f) for f in files]
