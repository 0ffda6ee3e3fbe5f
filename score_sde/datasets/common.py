"""What the dataset loaders share: `DataInfo`, the split names, the levels of 8-bit data, seed
mixing, and the checks and packing of a loader's result."""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from torch.utils.data import TensorDataset

SPLITS = ("train", "test")
NUM_LEVELS = 256  # levels of 8-bit image data


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


def mix_seed(*values: int) -> int:
    """A well-mixed 64-bit seed from small ints: (seed, epoch) and (seed + 1, epoch - 1) differ."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0])


IMAGE_DATASETS = ("fashion_mnist", "cifar10")  # the datasets read from data_dir


def reject_unused(name: str, **args) -> None:
    for arg, value in args.items():
        if value is not None:
            raise ValueError(f"dataset {name!r} does not use {arg} (got {value!r}); "
                             "data_dir is for fashion_mnist / cifar10, data_path for array")


def check_labels(path: str, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels must lie in 0..{num_classes - 1}, got range "
                         f"{labels.min()}..{labels.max()}")


def finish(x, y, num_samples, info):
    if num_samples is not None:
        x, y = x[:num_samples], None if y is None else y[:num_samples]
    return (TensorDataset(x) if y is None else TensorDataset(x, y)), info
