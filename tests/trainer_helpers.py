"""Trainer test helpers: a synthetic batch and torchrun launches of the scripts in tests/ranks/."""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

from sglgym.kernels import group_advantages
from sglgym.rollout.samples import Sample

RANKS_DIR = Path(__file__).parent / "ranks"


def synthetic_batch(vocab: int, seed: int = 0) -> dict:
    """3 groups of 4 samples, prompts of 4-9 tokens and completions of 2-9, varied rewards. Token 0 (the pad
    id) is left out: HF's embedding never updates its padding row, megatron's has no such row."""
    rng = random.Random(seed)
    samples = []
    for g in range(3):
        for _ in range(4):
            prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(4, 9))]
            gen = [rng.randrange(1, vocab) for _ in range(rng.randint(2, 9))]
            samples.append(Sample(
                token_ids=prompt + gen, loss_mask=[0] * len(prompt) + [1] * len(gen),
                gen_logprobs=[0.0] * len(prompt) + [-rng.uniform(0.5, 6.0) for _ in gen],
                turn_spans=[(len(prompt), len(prompt) + len(gen))], reward=rng.random(), group_id=g, prompt_index=g,
                truncated=False, num_turns=1, env="synthetic", engine_url=""))
    adv = group_advantages(torch.tensor([s.reward for s in samples]), torch.tensor([s.group_id for s in samples]),
                           baseline="mean", std_normalize=True)
    return {"samples": samples, "advantages": adv.tolist()}


def run_torchrun(script: str, nproc: int, args: list[str], timeout: float = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(RANKS_DIR / script), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


def step_parser() -> argparse.ArgumentParser:
    """Arguments of the one-step scripts in tests/ranks/."""
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", required=True)
    p.add_argument("--loss-agg", required=True)
    p.add_argument("--micro-batch-tokens", type=int, default=48)
    p.add_argument("--out", required=True)
    return p


def assert_same_update(new_weights: dict, single_model, bar: float = 1e-5, stable_grad: float = 1e-6) -> None:
    """The distributed step's updated weights equal the single process's within `bar` wherever the gradient
    is not ~0: Adam's first step is ~lr * g / |g|, so on entries with |g| < `stable_grad` the order in which ranks
    sum gradients (float rounding) decides the update. Those entries are few and counted, not compared."""
    weights = single_model.state_dict()
    grads = {n: p.grad for n, p in single_model.named_parameters()}
    assert set(new_weights) == set(weights)
    worst, unstable, total = 0.0, 0, 0
    for name, w in weights.items():
        stable = grads[name].abs() > stable_grad
        diff = (new_weights[name] - w).abs()
        worst = max(worst, diff[stable].max().item() if stable.any() else 0.0)
        unstable += int((~stable & (grads[name] != 0)).sum())
        total += w.numel()
    assert worst <= bar, f"updated weights differ by {worst:.2e}"
    assert unstable < 0.01 * total, f"{unstable} of {total} entries have a near-zero gradient"
