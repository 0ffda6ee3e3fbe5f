"""The order of training batches as a pure function of (seed, step): `BatchOrder`."""
from typing import Optional, Tuple

import torch

from .._utils import check_int
from .common import mix_seed

_ORDER_STREAM = 2  # the random stream of the epochs' permutations (see `mix_seed`)


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
