"""The GRPO loop: collect grouped rollouts -> advantages -> loss over micro-batches -> step -> refit.

Data flows one way: env -> rollout samples -> micro-batches -> loss -> weights -> engine. The engine is
a running `sglgym serve`; after every optimizer step the new weights are pushed into it (refit) and,
every `probe_every` steps, a probe checks that the engine's logprobs equal the trainer's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from sglgym.kernels import group_advantages
from sglgym.rollout.collector import collect_batch_sync

from .batches import make_micro_batches
from .config import TrainConfig
from .policy import HFPolicy
from .refit import DistributedRefit, EngineControl, probe, refit_from_disk, refit_from_tensor
from .rows import RowSource
from .warmup import has_reference_answers, prompt_ids, reference_samples

# per-env rollout metrics logged every step, as `<name>/<env>`
PER_ENV_KEYS = ("reward_mean", "reward_mean_kept", "samples", "truncation_rate", "rollouts_failed")


def _rollout_metrics(rmetrics: dict) -> dict:
    out = {"groups_filtered": rmetrics.get("groups_filtered", 0), "rollout_failures": len(rmetrics.get("failures", [])),
           "rows_requeued": rmetrics.get("rows_requeued", 0), "truncation_rate": rmetrics.get("truncation_rate", 0.0)}
    for env, m in rmetrics.get("per_env", {}).items():
        out.update({f"{key}/{env}": m[key] for key in PER_ENV_KEYS})
    return out


def machine_info(device: str) -> dict:
    import os
    import platform

    import sglang

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": device,
            "torch": torch.__version__, "sglang": sglang.__version__, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    else:
        try:
            info["load_average"] = os.getloadavg()
        except OSError:
            pass
    return info


class GRPOTrainer:
    def __init__(self, cfg: TrainConfig, policy: HFPolicy, engine: EngineControl, fleet, tokenizer):
        self.cfg, self.policy, self.engine, self.fleet, self.tokenizer = cfg, policy, engine, fleet, tokenizer
        self.weights = cfg.env_weights()
        self.envs = {name: fleet[name] for name in self.weights}
        self.rows = RowSource(self.envs, self.weights, seed=cfg.seed)
        self.loss_cfg = cfg.loss_config()
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        self.metrics_path.write_text("")
        self._dist: DistributedRefit | None = None
        self.version = 0

    # --- data -----------------------------------------------------------------------------------
    def _sampling(self) -> dict:
        return {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "max_tokens": self.cfg.max_tokens}

    def collect(self, rows: list[dict], group_size: int, groups: int, dynamic: bool, offset: int = 0,
                requeue=None):
        return collect_batch_sync(
            self.fleet, self.engine.base_url, rows, group_size=group_size, batch_groups=groups,
            sampling=self._sampling(), concurrency=self.cfg.concurrency, dynamic_sampling=dynamic,
            api_key=self.engine.api_key, progress=False, group_id_offset=offset, requeue=requeue,
        )

    # --- refit ----------------------------------------------------------------------------------
    def refit(self) -> float:
        self.version += 1
        version = f"step-{self.version}"
        if self.cfg.refit == "disk":
            return refit_from_disk(self.engine, self.policy.model, version, self.out / "refit-weights")
        if self.cfg.refit == "distributed":
            if self._dist is None:
                self._dist = DistributedRefit(self.engine)
            return self._dist.update(self.policy.named_tensors(), version)
        return refit_from_tensor(self.engine, self.policy.named_tensors(), version)

    def check_agreement(self, sequences: list[list[int]]) -> dict:
        sequences = sequences[:4]
        result = probe(self.engine, lambda seqs: self.policy.score(seqs, self.cfg.temperature), sequences,
                       atol=self.cfg.probe_atol)
        print(f"[train] {result}", flush=True)
        if not result.ok:
            print("[train] WARNING: engine and trainer logprobs diverge after refit: the engine is not "
                  "sampling from the weights being trained", flush=True)
        return {"probe_max_abs_diff": result.max_abs_diff, "probe_ok": result.ok}

    # --- warm-up and evaluation -----------------------------------------------------------------
    def sft_warmup(self) -> dict:
        cfg = self.cfg
        if cfg.sft_steps <= 0:
            return {}
        weights = {n: w for n, w in self.weights.items() if has_reference_answers(self.envs[n])}
        skipped = sorted(set(self.weights) - set(weights))
        if skipped:
            print(f"[train] env(s) {skipped}: rows have no expected_answer, not in the warm-up", flush=True)
        if not weights:
            return {}
        t0 = time.perf_counter()
        for group in self.policy.optimizer.param_groups:
            group["lr"] = cfg.sft_lr
        rows = RowSource(self.envs, weights, seed=10_000 + cfg.seed).take(cfg.sft_steps * cfg.sft_batch)
        samples = reference_samples(self.tokenizer, rows)
        loss = 0.0
        for step in range(cfg.sft_steps):
            batch = samples[step * cfg.sft_batch:(step + 1) * cfg.sft_batch]
            loss = self.policy.sft_step(make_micro_batches(batch, [0.0] * len(batch), cfg.micro_batch_tokens))
        for group in self.policy.optimizer.param_groups:
            group["lr"] = cfg.lr
        # Fresh optimizer state for RL: the warm-up's Adam moments are for another objective.
        self.policy.optimizer.state.clear()
        self.refit()
        out = {"sft_steps": cfg.sft_steps, "sft_final_loss": loss, "sft_s": time.perf_counter() - t0,
               "sft_envs": sorted(weights)}
        print(f"[train] warm-up: {cfg.sft_steps} supervised steps on {sorted(weights)}, final loss {loss:.3f} "
              f"({out['sft_s']:.1f}s)", flush=True)
        return out

    def evaluate(self, tag: str) -> dict[str, float]:
        """Mean reward on `eval_rows` held-out rows (split "test") of every env, sampled `eval_samples` times:
        {"all": over every sample, env: over that env's}."""
        rows = [row for env in self.envs.values()
                for row in env.dataset(self.cfg.eval_rows, seed=self.cfg.seed, split="test")]
        samples, m = self.collect(rows, group_size=self.cfg.eval_samples, groups=len(rows), dynamic=False,
                                  offset=1_000_000)
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

    # --- one GRPO step --------------------------------------------------------------------------
    def step_kl(self, mbs) -> float:
        """KL(pi_before || pi_after) of this step on its own tokens: k3 = r - 1 - log r, r = pi_after/pi_before,
        averaged over the generated tokens (which were sampled from pi_before)."""
        total, count = 0.0, 0
        for mb in mbs:
            before = mb.old_logprobs if mb.old_logprobs is not None else mb.gen_logprobs
            log_r = (self.policy.logprobs(mb, self.cfg.temperature).cpu() - before.cpu()).clamp(-20, 20)
            k3 = log_r.exp() - 1 - log_r
            mask = mb.loss_mask.cpu() != 0
            total += float(k3[mask].sum())
            count += int(mask.sum())
        return total / max(count, 1)

    def step(self, step: int) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        rows = self.rows.take(int(cfg.batch_groups * (2 if cfg.dynamic_sampling else 1)))
        samples, rmetrics = self.collect(rows, cfg.group_size, cfg.batch_groups, cfg.dynamic_sampling,
                                         offset=step * 100_000, requeue=self.rows.requeue)
        t_gen = time.perf_counter() - t0
        if not samples:
            return {"step": step, "skipped": "no group with reward signal", "gen_s": t_gen,
                    "reward_mean": rmetrics.get("reward_mean_finished"), **_rollout_metrics(rmetrics)}
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        group_ids = torch.tensor([s.group_id for s in samples])
        adv = group_advantages(rewards, group_ids, baseline=cfg.advantage_baseline,
                               std_normalize=cfg.advantage_std_normalize)
        mbs = make_micro_batches(samples, adv.tolist(), cfg.micro_batch_tokens)
        t1 = time.perf_counter()
        if self.loss_cfg.kl_type is not None:
            for mb in mbs:
                mb.ref_logprobs = self.policy.ref_logprobs(mb, cfg.temperature)
        if cfg.ppo_epochs > 1:
            # Several updates on one batch: the ratio is taken against the policy that generated it
            # (the trainer's own logprobs, so the clip sees the trainer's moves and not the engine's noise).
            for mb in mbs:
                mb.old_logprobs = self.policy.logprobs(mb, cfg.temperature)
        train = self.policy.grpo_step(mbs, self.loss_cfg)
        for _ in range(cfg.ppo_epochs - 1):
            last = self.policy.grpo_step(mbs, self.loss_cfg)
            train.update({"loss_last_epoch": last["loss"], "clip_frac_high": last["clip_frac_high"],
                          "clip_frac_low": last["clip_frac_low"]})
        train["kl_step"] = self.step_kl(mbs)
        t_train = time.perf_counter() - t1
        t_refit = self.refit()
        out = {
            # reward_mean: every finished rollout (what the policy scores); _kept: the groups trained on
            "step": step, "reward_mean": rmetrics.get("reward_mean_finished"), "reward_mean_kept": float(rewards.mean()),
            "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "adv_mean": float(adv.mean()), "adv_std": float(adv.std()) if len(adv) > 1 else 0.0,
            "adv_abs_max": float(adv.abs().max()),
            **{k: v for k, v in train.items()},
            "samples": len(samples), "gen_tokens": sum(s.num_generated for s in samples),
            **_rollout_metrics(rmetrics), "gen_s": t_gen, "train_s": t_train, "refit_s": t_refit,
        }
        out["tokens_per_s"] = out["gen_tokens"] / max(t_gen, 1e-9)
        out["step_s"] = time.perf_counter() - t0
        if cfg.probe_every and step % cfg.probe_every == 0:
            out.update(self.check_agreement([s.token_ids for s in samples]))
        return out

    def log(self, metrics: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")

    # --- the run --------------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        t_start = time.perf_counter()
        summary: dict = {"config": cfg.__dict__.copy(), "machine": machine_info(self.policy.device)}
        summary.update(self.sft_warmup())
        if self.loss_cfg.kl_type is not None:  # KL to the policy GRPO starts from (after the warm-up)
            self.policy.freeze_reference()
        summary["probe_before_grpo"] = self.check_agreement(
            [prompt_ids(self.tokenizer, row) for env in self.envs.values() for row in env.dataset(2, seed=7)])
        before = self.evaluate("before GRPO")
        t_grpo = time.perf_counter()
        bar = tqdm(range(1, cfg.steps + 1), desc="grpo", unit="step", dynamic_ncols=True)
        step = 0
        for step in bar:
            m = self.step(step)
            self.log(m)
            if "reward_mean" in m and m["reward_mean"] is not None:
                bar.set_postfix(reward=f"{m['reward_mean']:.2f}", mismatch=f"{m.get('token_mult_prob_error', 0):.4f}")
            if cfg.time_budget_s and time.perf_counter() - t_grpo > cfg.time_budget_s:
                print(f"\n[train] time budget {cfg.time_budget_s:.0f}s reached after {step} steps", flush=True)
                break
        bar.close()
        summary["grpo_steps"] = step
        after = self.evaluate("after GRPO")
        summary.update(reward_before=before.pop("all"), reward_after=after.pop("all"),
                       reward_before_per_env=before, reward_after_per_env=after)
        summary["reward_gain"] = summary["reward_after"] - summary["reward_before"]
        summary["total_s"] = time.perf_counter() - t_start
        if self._dist is not None:
            self._dist.close()
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary
