"""Run under torchrun by tests/test_trainer_fsdp.py: one GRPO step of the `fsdp` backend on a batch from a
file, each rank on its token-balanced share, micro-batches of `--micro-batch-tokens`. Rank 0 writes the
loss, the full gradients and the updated full weights.

    torchrun --nproc-per-node 2 tests/ranks/fsdp_step.py --model M --batch B.pt --loss-agg token-mean --out O.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from device_guard import simulated_device  # noqa: E402
from trainer_helpers import step_parser  # noqa: E402

from sglgym.kernels import GRPOLossConfig
from sglgym.trainer.batches import make_micro_batches, split_over_ranks
from sglgym.trainer.fsdp import FSDPPolicy
from sglgym.trainer.policy import OptimConfig
from sglgym.trainer.ranks import close_ranks, init_ranks
from sglgym.trainer.update import PolicyUpdate


def main() -> None:
    p = step_parser()
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sft", action="store_true", help="a supervised warm-up step instead of a GRPO step")
    p.add_argument("--guard", action="store_true",
                   help="the whole train step (KL reference, 2 PPO epochs, step KL, weight gather) under the "
                        "simulated device of tests/device_guard.py")
    args = p.parse_args()

    ranks = init_ranks(timeout_s=300)
    batch = torch.load(args.batch, weights_only=False)
    policy = FSDPPolicy(args.model, OptimConfig(lr=args.lr), ranks=ranks)
    mine, adv = split_over_ranks(batch["samples"], batch["advantages"], ranks.world_size)[ranks.rank]
    if args.guard:
        policy.freeze_reference()  # loads a model: host work by design, outside the guard
        guard = simulated_device()
        with guard:
            loss_cfg = GRPOLossConfig(loss_agg=args.loss_agg, kl_type="k3", beta=0.05)
            metrics = PolicyUpdate(policy, loss_cfg, ppo_epochs=2, micro_batch_tokens=args.micro_batch_tokens)(mine, adv)
            policy.named_tensors()
        metrics["guard_checked_ops"] = guard.checked
    mbs = make_micro_batches(mine, adv, args.micro_batch_tokens)
    if args.sft:
        metrics = {"loss": policy.sft_step(mbs)}
    elif not args.guard:
        metrics = policy.grpo_step(mbs, GRPOLossConfig(loss_agg=args.loss_agg, eps_high=0.28))
    grads = {n: (p.grad.full_tensor() if p.grad is not None else None) for n, p in policy.model.named_parameters()}
    weights = dict(policy.named_tensors())
    if ranks.main:
        torch.save({"metrics": metrics, "grads": grads, "weights": weights, "micro_batches": len(mbs),
                    "world_size": ranks.world_size}, args.out)
    ranks.barrier()
    close_ranks(ranks)


if __name__ == "__main__":
    main()
