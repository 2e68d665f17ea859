"""The trainer's ranks under torchrun: rank 0 drives environments, rollouts and the engine; every rank
trains on its share of the step's samples.

One process without torchrun is a world of size 1 and every helper is a no-op. Every collective runs
with the process group's timeout (`dist_timeout_s`), so a dead rank ends the run with an error instead
of a hang.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False   # this run created the process group (and destroys it at the end)
    tp: int = 1                # tensor-parallel ranks that see the same data (megatron; adjacent ranks)

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    def per_rank(self, per_dp: Sequence[Any]) -> list[Any]:
        """One object per data-parallel rank -> one per rank (the tensor-parallel ranks of a group share it)."""
        return [per_dp[r // self.tp] for r in range(self.world_size)]

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        """The data-parallel group (every rank), or None for a single process."""
        return dist.group.WORLD if self.world_size > 1 else None

    def device(self) -> str:
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return f"cuda:{self.local_rank}"
        return "cpu"

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def scatter(self, per_rank: Sequence[Any] | None) -> Any:
        """Rank 0 passes one object per rank; every rank gets its own."""
        if self.world_size == 1:
            return per_rank[0]
        out = [None]
        dist.scatter_object_list(out, list(per_rank) if self.main else None, src=0)
        return out[0]

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _collective_device(self) -> str:
        return f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu"


def init_ranks(timeout_s: float = 1800.0) -> Ranks:
    """Join torchrun's process group when launched by torchrun (RANK set; also a world of one, which FSDP
    needs), else a world of one without a process group."""
    if "RANK" not in os.environ:
        return Ranks()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ranks = Ranks(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        ranks.owns_group = True
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return ranks


def close_ranks(ranks: Ranks) -> None:
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()
