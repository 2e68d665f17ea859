"""Run under torchrun by tests/test_trainer_resume.py: a `megatron` checkpoint (TP=2 on 2 ranks; CUDA
assumptions patched by tests/megatron_cpu.py) restores the trainer exactly, as checkpoint_roundtrip.py
checks for hf and fsdp: the weights at the checkpoint bit for bit, and the next step equal to the one the
saved trainer took (so the optimizer state came back)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_cpu import megatron_on_cpu  # noqa: E402
from trainer_helpers import step_parser  # noqa: E402

from sglgym.kernels import GRPOLossConfig  # noqa: E402
from sglgym.trainer.batches import make_micro_batches, split_over_ranks  # noqa: E402
from sglgym.trainer.checkpoint import Checkpointer, latest_checkpoint  # noqa: E402
from sglgym.trainer.policy import OptimConfig  # noqa: E402
from sglgym.trainer.ranks import Ranks  # noqa: E402


def main() -> None:
    p = step_parser()
    p.add_argument("--dir", required=True)
    args = p.parse_args()
    rank, world, tp = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), 2
    torch.set_num_threads(1)
    with megatron_on_cpu(tp=tp, rank=rank, world_size=world, init_method="env://"):
        from sglgym.trainer.megatron_policy import MegatronPolicy

        ranks = Ranks(rank=rank, world_size=world, tp=tp)
        make = lambda: MegatronPolicy(args.model, OptimConfig(lr=1e-3, grad_clip=0.0), ranks=ranks, tp=tp,  # noqa: E731
                                      device="cpu")
        batch = torch.load(args.batch, weights_only=False)
        mine, adv = ranks.per_rank(split_over_ranks(batch["samples"], batch["advantages"], ranks.dp_size))[rank]
        loss_cfg = GRPOLossConfig(loss_agg=args.loss_agg, eps_high=0.28)
        step = lambda policy: policy.grpo_step(make_micro_batches(mine, adv, args.micro_batch_tokens), loss_cfg)  # noqa: E731
        full = lambda policy: {n: t.clone() for n, t in policy.named_tensors()}  # noqa: E731

        a = make()
        step(a)
        Checkpointer(Path(args.dir), ranks).save(1, a, {"weight_version": 1})
        at_checkpoint = full(a)
        step(a)
        after_two = full(a)
        b = make()
        Checkpointer(Path(args.dir), ranks).load(latest_checkpoint(Path(args.dir)), b)
        loaded = full(b)
        step(b)
        b_after_two = full(b)
        if rank == 0:
            torch.save({
                "names": sorted(at_checkpoint),
                "weights_equal": sorted(n for n in at_checkpoint if torch.equal(at_checkpoint[n], loaded[n])),
                "next_step_equal": sorted(n for n in after_two if torch.equal(after_two[n], b_after_two[n])),
                "second_step_moved": max((after_two[n] - at_checkpoint[n]).abs().max().item() for n in after_two),
                "files": sorted(f.name for f in latest_checkpoint(Path(args.dir)).iterdir()),
            }, args.out)
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
