"""Per-batch rollout metrics: rewards, turns, tokens, truncation, throughput, failures."""

from __future__ import annotations

import math
from collections import Counter

from .samples import Sample


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _std(xs) -> float:
    xs = list(xs)
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def batch_metrics(samples: list[Sample], *, wall_s: float, finished: list[Sample], failures: list[dict],
                  groups_kept: int, groups_filtered: int, groups_failed: int, groups_cancelled: int,
                  engine_assigned: dict[str, int]) -> dict:
    """`samples`: the batch; `finished`: every rollout that completed (batch, filtered, cancelled groups),
    which is what the engine really produced, so throughput is measured on it."""
    rewards = [s.reward for s in samples]
    gen = sum(s.num_generated for s in finished)
    total = sum(len(s.token_ids) for s in finished)
    wall = max(wall_s, 1e-9)
    return {
        "samples": len(samples),
        "groups": groups_kept,
        "groups_filtered": groups_filtered,      # dynamic sampling: all rewards equal
        "groups_failed": groups_failed,
        "groups_cancelled": groups_cancelled,    # over-sampled groups still running when the batch filled
        "rollouts_finished": len(finished),
        "rollouts_failed": len(failures),
        "failure_stages": dict(Counter(f["stage"] for f in failures)),
        "rollouts_split": sum(1 for s in finished if s.segment_starts),   # split at a break in the history
        "reward_mean": _mean(rewards),
        "reward_std": _std(rewards),
        "reward_mean_finished": _mean(s.reward for s in finished),  # before the dynamic-sampling filter
        "turns_mean": _mean(s.num_turns for s in samples),
        "turns_max": max((s.num_turns for s in samples), default=0),
        "tokens_mean": _mean(len(s.token_ids) for s in samples),
        "gen_tokens_mean": _mean(s.num_generated for s in samples),
        "tokens_total": sum(len(s.token_ids) for s in samples),
        "truncation_rate": _mean(1.0 if s.truncated else 0.0 for s in samples),
        "wall_s": wall_s,
        "samples_per_s": len(finished) / wall,
        "gen_tokens_per_s": gen / wall,
        "tokens_per_s": total / wall,
        "engine_rollouts": dict(engine_assigned),
        "per_env": per_env_metrics(samples, finished, failures),
    }


def per_env_metrics(samples: list[Sample], finished: list[Sample], failures: list[dict]) -> dict[str, dict]:
    """Reward, truncation and failures of each env of a mixed batch (finished: before the dynamic-sampling
    filter; kept: the groups trained on)."""
    names = sorted({s.env for s in finished} | {f["env"] for f in failures} | {s.env for s in samples})
    out = {}
    for name in names:
        done = [s for s in finished if s.env == name]
        kept = [s for s in samples if s.env == name]
        out[name] = {
            "reward_mean": _mean(s.reward for s in done),
            "reward_mean_kept": _mean(s.reward for s in kept),
            "samples": len(kept),
            "rollouts_finished": len(done),
            "rollouts_failed": sum(1 for f in failures if f["env"] == name),
            "truncation_rate": _mean(1.0 if s.truncated else 0.0 for s in done),
            "turns_mean": _mean(s.num_turns for s in done),
        }
    return out
