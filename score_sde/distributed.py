"""Process layout for multi-process training (torchrun) and device selection.

`torchrun --nproc_per_node=N -m score_sde.train ...` starts N processes with RANK, WORLD_SIZE and
LOCAL_RANK set; `dist_from_env` reads them, `resolve_device` picks each process's device and
`process_group_backend` the collective backend (NCCL on CUDA, gloo on the CPU).
"""
import dataclasses
import datetime
from typing import Mapping

import torch

# Environment variables torchrun sets for each process.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Collectives wait this long, e.g. for rank 0 to write samples and checkpoints.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun launch; the default is a single process."""

    rank: int = 0  # global rank, 0 <= rank < world_size
    local_rank: int = 0  # rank on this machine (its GPU index)
    world_size: int = 1  # number of processes

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files."""
        return self.rank == 0

    def shard(self, batch_size: int) -> slice:
        """This process's contiguous slice of a global batch, as in `BatchOrder.indices`."""
        local = batch_size // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)


def dist_from_env(env: Mapping[str, str]) -> DistInfo:
    """The process layout from torchrun's RANK, WORLD_SIZE and LOCAL_RANK (none: one process).

    Raises:
        ValueError: only some of the variables are set, or they are not integers with
            0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0.
    """
    present = [name for name in TORCHRUN_VARS if name in env]
    if not present:
        return DistInfo()
    if len(present) < len(TORCHRUN_VARS):
        raise ValueError(f"torchrun sets {', '.join(TORCHRUN_VARS)}, but only "
                         f"{', '.join(present)} is set in the environment")
    values = {name: env[name] for name in TORCHRUN_VARS}
    try:
        rank, world_size, local_rank = (int(values[name]) for name in TORCHRUN_VARS)
    except ValueError:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {values}") \
            from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got {values}")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size)


def resolve_device(name: str, dist: DistInfo = DistInfo()) -> torch.device:
    """The device of this process: "auto" picks CUDA if available; a plain "cuda" means the
    current GPU (cuda:N, always with an index); under torchrun it means cuda:LOCAL_RANK.

    Raises:
        ValueError: a device other than CPU / CUDA, CUDA requested but unavailable; under
            torchrun, a fixed "cuda:N" (every process would share one GPU) or too few GPUs.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if dist.world_size == 1:
        if device.type == "cuda" and device.index is None:  # pin "cuda" to a concrete GPU
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {name} would put every torchrun process on one GPU; "
                             f"use --device cuda (process LOCAL_RANK takes cuda:LOCAL_RANK)")
        if dist.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={dist.local_rank} needs cuda:{dist.local_rank}, but "
                             f"only {torch.cuda.device_count()} GPUs are visible")
        return torch.device("cuda", dist.local_rank)
    return device


def process_group_backend(device: torch.device) -> str:
    """The torch.distributed backend for `device`: NCCL for CUDA, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"
