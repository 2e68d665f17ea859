"""A checkpoint restores the trainer exactly: run by tests/test_trainer_resume.py, under torchrun for `fsdp`
(2 ranks) or as one process for `hf`.

Policy A takes a GRPO step, is checkpointed, takes a second step. Policy B, built fresh, loads the
checkpoint: its weights must equal A's at the checkpoint bit for bit, its RNG must continue as A's did,
and its own second step must give A's weights after the second step bit for bit (so Adam's moments and
step count came back too). Rank 0 writes what it found to --out.

    torchrun --nproc-per-node 2 tests/ranks/checkpoint_roundtrip.py --backend fsdp --model M --batch B.pt --dir D --out O.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglgym.kernels import GRPOLossConfig
from sglgym.trainer.batches import split_over_ranks
from sglgym.trainer.checkpoint import Checkpointer, latest_checkpoint
from sglgym.trainer.policy import HFPolicy, OptimConfig
from sglgym.trainer.ranks import close_ranks, init_ranks
from sglgym.trainer.update import PolicyUpdate


def make_policy(backend: str, model: str, ranks) -> HFPolicy:
    if backend == "fsdp":
        from sglgym.trainer.fsdp import FSDPPolicy
        policy = FSDPPolicy(model, OptimConfig(lr=1e-3), ranks=ranks)
    else:
        policy = HFPolicy(model, OptimConfig(lr=1e-3), ranks=ranks)
    policy.freeze_reference()  # the KL reference is part of the state too
    return policy


def full_weights(policy: HFPolicy) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in policy.named_tensors()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", choices=["hf", "fsdp"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--batch", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    ranks = init_ranks(timeout_s=300)
    batch = torch.load(args.batch, weights_only=False)
    mine, adv = split_over_ranks(batch["samples"], batch["advantages"], ranks.world_size)[ranks.rank]
    loss_cfg = GRPOLossConfig(loss_agg="token-mean", eps_high=0.28, kl_type="k3", beta=0.05)
    step = lambda policy: PolicyUpdate(policy, loss_cfg, ppo_epochs=2, micro_batch_tokens=48)(mine, adv)  # noqa: E731

    a = make_policy(args.backend, args.model, ranks)
    step(a)
    saver = Checkpointer(Path(args.dir), ranks, keep_last=1)
    saver.save(1, a, {"weight_version": 1})
    at_checkpoint = full_weights(a)
    rng_after_save = torch.rand(4)
    step(a)
    after_two = full_weights(a)

    torch.manual_seed(12345)  # B starts from another RNG state: loading must put A's back
    b = make_policy(args.backend, args.model, ranks)
    state = Checkpointer(Path(args.dir), ranks).load(latest_checkpoint(Path(args.dir)), b)
    rng_after_load = torch.rand(4)
    loaded = full_weights(b)
    step(b)
    b_after_two = full_weights(b)
    if ranks.main:
        moved = max((after_two[n] - at_checkpoint[n]).abs().max().item() for n in at_checkpoint)
        torch.save({
            "state": state, "world_size": ranks.world_size, "second_step_moved": moved,
            "weights_equal": sorted(n for n in at_checkpoint if torch.equal(at_checkpoint[n], loaded[n])),
            "next_step_equal": sorted(n for n in after_two if torch.equal(after_two[n], b_after_two[n])),
            "names": sorted(at_checkpoint), "rng_equal": torch.equal(rng_after_save, rng_after_load),
        }, args.out)
    ranks.barrier()
    close_ranks(ranks)


if __name__ == "__main__":
    main()
