"""Rank 0's side of a GRPO step: rows -> grouped rollouts on the engines -> samples with advantages; and
the held-out evaluation. Only rank 0 talks to environments and engines."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sglgym.kernels import group_advantages
from sglgym.rollout.collector import collect_batch_sync
from sglgym.rollout.samples import Sample

from .config import TrainConfig
from .rows import RowSource

# per-env rollout metrics logged every step, as `<name>/<env>`
PER_ENV_KEYS = ("reward_mean", "reward_mean_kept", "samples", "truncation_rate", "rollouts_failed", "turns_mean")


@dataclass
class StepBatch:
    samples: list[Sample]
    advantages: list[float]
    metrics: dict = field(default_factory=dict)
    refit_needed: bool = False   # an engine was restarted: refit it, then collect the step again


def rollout_metrics(rmetrics: dict) -> dict:
    failures = rmetrics.get("failures", [])
    out = {"groups_filtered": rmetrics.get("groups_filtered", 0), "rollout_failures": len(failures),
           "rows_requeued": rmetrics.get("rows_requeued", 0), "rollouts_split": rmetrics.get("rollouts_split", 0),
           "truncation_rate": rmetrics.get("truncation_rate", 0.0),
           "reward_mean": rmetrics.get("reward_mean_finished")}
    if failures:
        out["rollout_failures_by_stage"] = dict(Counter(f["stage"] for f in failures))
    for env, m in rmetrics.get("per_env", {}).items():
        out.update({f"{key}/{env}": m[key] for key in PER_ENV_KEYS})
    return out


def tagged_seed(seed: int, tag: str) -> int:
    """A base seed per step (or evaluation) of a run: the run's seed and the tag, hashed into [0, 2**63)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{tag}".encode(), digest_size=8).digest(), "big") >> 1


class Rollouts:
    def __init__(self, cfg: TrainConfig, fleet, engine_urls: list[str], api_key: str | None, out_dir: Path,
                 recovery=None):
        self.cfg, self.fleet, self.engine_urls, self.api_key = cfg, fleet, engine_urls, api_key
        self.recovery = recovery            # restarts dead engines / env servers (trainer/recovery.py)
        self.rollouts_resubmitted = 0
        self.envs = {name: fleet[name] for name in cfg.env_weights()}
        self.rows = RowSource(self.envs, cfg.env_weights(), seed=cfg.seed)
        self.failures_path = out_dir / "failures.jsonl"  # every failed rollout, with its stage and error

    def collect(self, rows: list[dict], group_size: int, groups: int, dynamic: bool, offset: int = 0, requeue=None,
                seed_tag: str = ""):
        cfg = self.cfg
        sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
        if cfg.rollout_seed is not None:   # the agent derives each (prompt, sample, turn)'s seed from it
            sampling["seed"] = tagged_seed(cfg.rollout_seed, seed_tag)
        return collect_batch_sync(
            self.fleet, self.engine_urls, rows, group_size=group_size, batch_groups=groups,
            sampling=sampling,
            concurrency=cfg.concurrency, dynamic_sampling=dynamic, api_key=self.api_key, progress=False,
            group_id_offset=offset, requeue=requeue,
            continue_aborted=cfg.continue_aborted if cfg.max_staleness else 0)  # async: refits may abort turns

    def step_batch(self, step: int, attempts: int = 3) -> StepBatch:
        """The step's groups (dynamic sampling keeps those with reward signal) and their advantages. When
        rollouts failed because an engine or env server died, it is restarted and the step's rows are
        collected again (an engine restart returns first with `refit_needed`: the caller refits it)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        for attempt in range(attempts):
            cursor = self.rows.state()
            rows = self.rows.take(int(cfg.batch_groups * (2 if cfg.dynamic_sampling else 1)))
            samples, rmetrics = self.collect(rows, cfg.group_size, cfg.batch_groups, cfg.dynamic_sampling,
                                             offset=step * 100_000, requeue=self.rows.requeue, seed_tag=f"step-{step}")
            failures = rmetrics.get("failures", [])
            self._log_failures(step, failures)
            if not failures or self.recovery is None or attempt == attempts - 1:
                break
            envs_before = self.recovery.env_restarts
            try:
                engine_restarted = self.recovery.after_failures()
            except Exception:
                self.rows.load_state(cursor)  # a checkpoint taken now hands these rows out again
                raise
            if not engine_restarted and self.recovery.env_restarts == envs_before:
                break  # nothing died: the failures are the rollouts' own
            self.rows.load_state(cursor)  # the same rows again
            self.rollouts_resubmitted += len(failures)
            if engine_restarted:
                return StepBatch([], [], {}, refit_needed=True)
        metrics = {**rollout_metrics(rmetrics), "gen_s": time.perf_counter() - t0}
        if self.recovery is not None:
            metrics.update(self.recovery.metrics(), rollouts_resubmitted=self.rollouts_resubmitted)
        if not samples:
            return StepBatch([], [], {**metrics, "skipped": "no group with reward signal"})
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        adv = group_advantages(rewards, torch.tensor([s.group_id for s in samples]), baseline=cfg.advantage_baseline,
                               std_normalize=cfg.advantage_std_normalize)
        gen_tokens = sum(s.num_generated for s in samples)
        metrics.update({
            # reward_mean: every finished rollout (what the policy scores); _kept: the groups trained on
            "reward_mean_kept": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "adv_mean": float(adv.mean()), "adv_std": float(adv.std()) if len(adv) > 1 else 0.0,
            "adv_abs_max": float(adv.abs().max()), "samples": len(samples), "gen_tokens": gen_tokens,
            "tokens_per_s": gen_tokens / max(metrics["gen_s"], 1e-9)})
        return StepBatch(samples, adv.tolist(), metrics)

    def _log_failures(self, step: int, failures: list[dict]) -> None:
        if failures:
            with self.failures_path.open("a") as f:
                for failure in failures:
                    f.write(json.dumps({"step": step, **failure}) + "\n")

    def evaluate(self, tag: str) -> dict[str, float]:
        """Mean reward on `eval_rows` held-out rows (split "test") of every env, sampled `eval_samples` times:
        {"all": over every sample, env: over that env's}."""
        cfg = self.cfg
        rows = [row for env in self.envs.values() for row in env.dataset(cfg.eval_rows, seed=cfg.seed, split="test")]
        samples, m = self.collect(rows, group_size=cfg.eval_samples, groups=len(rows), dynamic=False, offset=1_000_000,
                                  seed_tag=f"eval-{tag}")
        rewards = {"all": sum(s.reward for s in samples) / max(len(samples), 1)}
        for name in self.envs:
            mine = [s.reward for s in samples if s.env == name]
            rewards[name] = sum(mine) / max(len(mine), 1)
        detail = [f"{n} {rewards[n]:.3f}" for n in self.envs] if len(self.envs) > 1 else []
        if m["rollouts_failed"]:
            detail.append(f"{m['rollouts_failed']} rollouts failed")
        print(f"[train] eval ({tag}): mean reward {rewards['all']:.3f} over {len(samples)} samples of {len(rows)} "
              f"held-out prompts" + (f" ({', '.join(detail)})" if detail else ""), flush=True)
        return rewards
