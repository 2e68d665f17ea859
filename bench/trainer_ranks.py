"""Worker of bench/bench_trainer.py, run under torchrun: timed GRPO updates of one backend on a synthetic
batch, and the time to gather the full weights for a refit. Rank 0 prints one JSON line."""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from sglgym.kernels import GRPOLossConfig
from sglgym.rollout.samples import Sample
from sglgym.trainer.batches import split_over_ranks
from sglgym.trainer.policy import HFPolicy, OptimConfig
from sglgym.trainer.ranks import close_ranks, init_ranks
from sglgym.trainer.update import PolicyUpdate


def batch(vocab: int, n: int, prompt: int, gen: int, seed: int = 0) -> tuple[list[Sample], list[float]]:
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        ids = [rng.randrange(vocab) for _ in range(prompt + gen)]
        samples.append(Sample(token_ids=ids, loss_mask=[0] * prompt + [1] * gen,
                              gen_logprobs=[0.0] * prompt + [-2.0] * gen, turn_spans=[(prompt, prompt + gen)],
                              reward=rng.random(), group_id=i // 8, prompt_index=i // 8, truncated=False,
                              num_turns=1, env="bench", engine_url=""))
    return samples, [rng.uniform(-1, 1) for _ in samples]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--backend", choices=["hf", "fsdp"], required=True)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch-tokens", type=int, default=2048)
    args = p.parse_args()
    ranks = init_ranks(timeout_s=600)
    if args.backend == "fsdp":
        from sglgym.trainer.fsdp import FSDPPolicy
        policy = FSDPPolicy(args.model, OptimConfig(lr=1e-4), ranks=ranks)
    else:
        policy = HFPolicy(args.model, OptimConfig(lr=1e-4), ranks=ranks)
    vocab = policy.model.config.vocab_size
    samples, adv = batch(vocab, args.samples, args.prompt, args.gen)
    mine, my_adv = split_over_ranks(samples, adv, ranks.world_size)[ranks.rank]
    update = PolicyUpdate(policy, GRPOLossConfig(), ppo_epochs=1, micro_batch_tokens=args.micro_batch_tokens)
    update(mine, my_adv)  # warm-up (allocations, first collectives)
    ranks.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        update(mine, my_adv)
    ranks.barrier()
    step_s = (time.perf_counter() - t0) / args.steps
    t1 = time.perf_counter()
    named = policy.named_tensors()
    gather_s = time.perf_counter() - t1
    if ranks.main:
        params = sum(t.numel() for _, t in named)
        print(json.dumps({
            "backend": args.backend, "ranks": ranks.world_size, "params": params, "step_s": step_s,
            "steps_per_s": 1 / step_s, "tokens_per_s": args.samples * (args.prompt + args.gen) / step_s,
            "gather_full_weights_s": gather_s, "gather_gb_per_s": params * 4 / 1e9 / max(gather_s, 1e-9),
            "threads_per_rank": torch.get_num_threads()}), flush=True)
    close_ranks(ranks)


if __name__ == "__main__":
    main()
