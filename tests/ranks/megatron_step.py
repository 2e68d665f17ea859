"""Run under torchrun by tests/test_trainer_megatron.py: one GRPO step of the `megatron` backend (megatron-core's
real schedule, DDP and optimizer; CUDA assumptions patched by tests/megatron_cpu.py) on a batch from a file,
tensor parallel over `--tp` ranks and data parallel over the rest. Rank 0 writes the metrics and the updated
weights in Hugging Face names.
"""

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
from sglgym.trainer.policy import OptimConfig  # noqa: E402
from sglgym.trainer.ranks import Ranks  # noqa: E402


def main() -> None:
    p = step_parser()
    p.add_argument("--tp", type=int, required=True)
    args = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    with megatron_on_cpu(tp=args.tp, rank=rank, world_size=world, init_method="env://"):
        from sglgym.trainer.megatron_policy import MegatronPolicy

        ranks = Ranks(rank=rank, world_size=world, tp=args.tp)
        # megatron clips with a CUDA-only assert: no clipping here (the reference step does not clip either)
        policy = MegatronPolicy(args.model, OptimConfig(lr=1e-3, grad_clip=0.0), ranks=ranks, tp=args.tp, device="cpu")
        batch = torch.load(args.batch, weights_only=False)
        mine, adv = ranks.per_rank(split_over_ranks(batch["samples"], batch["advantages"], ranks.dp_size))[rank]
        mbs = make_micro_batches(mine, adv, args.micro_batch_tokens)
        metrics = policy.grpo_step(mbs, GRPOLossConfig(loss_agg=args.loss_agg, eps_high=0.28))
        scores = policy.score([batch["samples"][0].token_ids])
        weights = dict(policy.named_tensors())
        if rank == 0:
            torch.save({"metrics": metrics, "weights": weights, "scores": scores, "micro_batches": len(mbs)}, args.out)
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
