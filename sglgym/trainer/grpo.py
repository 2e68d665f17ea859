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
from sglgym.rollout.responses import to_chat_messages, to_chat_tools
from sglgym.rollout.samples import Sample

from .batches import make_micro_batches
from .config import TrainConfig
from .policy import HFPolicy
from .refit import DistributedRefit, EngineControl, probe, refit_from_disk, refit_from_tensor


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
        self.env = fleet[cfg.env]
        self.loss_cfg = cfg.loss_config()
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        self.metrics_path.write_text("")
        self._dist: DistributedRefit | None = None
        self._rows = iter(())
        self._row_seed = cfg.seed
        self.version = 0

    # --- data -----------------------------------------------------------------------------------
    def next_rows(self, n: int) -> list[dict]:
        rows = []
        while len(rows) < n:
            try:
                rows.append(next(self._rows))
            except StopIteration:
                self._rows = iter(self.env.dataset(4096, seed=self._row_seed, split="train"))
                self._row_seed += 1
        return rows

    def _sampling(self) -> dict:
        return {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "max_tokens": self.cfg.max_tokens}

    def collect(self, rows: list[dict], group_size: int, groups: int, dynamic: bool, offset: int = 0):
        return collect_batch_sync(
            self.fleet, self.engine.base_url, rows, group_size=group_size, batch_groups=groups,
            sampling=self._sampling(), concurrency=self.cfg.concurrency, dynamic_sampling=dynamic,
            api_key=self.engine.api_key, progress=False, group_id_offset=offset,
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

    # --- warm-up --------------------------------------------------------------------------------
    def prompt_ids(self, row: dict) -> list[int]:
        params = row["responses_create_params"]
        text = self.tokenizer.apply_chat_template(
            to_chat_messages(params["input"]), tools=to_chat_tools(params.get("tools")),
            add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def reference_samples(self, rows: list[dict]) -> list[Sample]:
        """Prompt + the row's reference answer + EOS, loss on the answer.

        The prompt is rendered with the served model's own tokenizer and chat template, which give the
        same ids as the engine's /tokenize (tests/test_engine_route.py checks that).
        """
        samples = []
        eos = self.tokenizer.eos_token_id
        for i, row in enumerate(rows):
            prompt = self.prompt_ids(row)
            answer = self.tokenizer.encode(str(row["expected_answer"]), add_special_tokens=False) + [eos]
            ids = prompt + answer
            samples.append(Sample(token_ids=ids, loss_mask=[0] * len(prompt) + [1] * len(answer),
                                  gen_logprobs=[0.0] * len(ids), turn_spans=[(len(prompt), len(ids))], reward=1.0,
                                  group_id=i, prompt_index=i, truncated=False, num_turns=1, env=self.env.name,
                                  engine_url=""))
        return samples

    def sft_warmup(self) -> dict:
        cfg = self.cfg
        if cfg.sft_steps <= 0:
            return {}
        probe_row = self.env.dataset(1, seed=cfg.seed, split="train")[0]
        if "expected_answer" not in probe_row:
            print(f"[train] env {self.env.name} rows have no expected_answer: skipping the warm-up", flush=True)
            return {}
        t0 = time.perf_counter()
        for group in self.policy.optimizer.param_groups:
            group["lr"] = cfg.sft_lr
        rows = self.env.dataset(cfg.sft_steps * cfg.sft_batch, seed=10_000 + cfg.seed, split="train")
        samples = self.reference_samples(rows)
        loss = 0.0
        for step in range(cfg.sft_steps):
            batch = samples[step * cfg.sft_batch:(step + 1) * cfg.sft_batch]
            loss = self.policy.sft_step(make_micro_batches(batch, [0.0] * len(batch), cfg.micro_batch_tokens))
        for group in self.policy.optimizer.param_groups:
            group["lr"] = cfg.lr
        # Fresh optimizer state for RL: the warm-up's Adam moments are for another objective.
        self.policy.optimizer.state.clear()
        self.refit()
        out = {"sft_steps": cfg.sft_steps, "sft_final_loss": loss, "sft_s": time.perf_counter() - t0}
        print(f"[train] warm-up: {cfg.sft_steps} supervised steps, final loss {loss:.3f} "
              f"({out['sft_s']:.1f}s)", flush=True)
        return out

    def evaluate(self, tag: str) -> float:
        rows = self.env.dataset(self.cfg.eval_rows, seed=self.cfg.seed, split="test")
        samples, _ = self.collect(rows, group_size=self.cfg.eval_samples, groups=len(rows), dynamic=False,
                                  offset=1_000_000)
        reward = sum(s.reward for s in samples) / max(len(samples), 1)
        print(f"[train] eval ({tag}): mean reward {reward:.3f} over {len(samples)} samples of {len(rows)} "
              "held-out prompts", flush=True)
        return reward

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
        rows = self.next_rows(int(cfg.batch_groups * (2 if cfg.dynamic_sampling else 1)))
        samples, rmetrics = self.collect(rows, cfg.group_size, cfg.batch_groups, cfg.dynamic_sampling,
                                         offset=step * 100_000)
        t_gen = time.perf_counter() - t0
        if not samples:
            return {"step": step, "skipped": "no group with reward signal", "gen_s": t_gen,
                    "reward_mean": rmetrics.get("reward_mean_finished")}
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
            "groups_filtered": rmetrics.get("groups_filtered", 0), "rollout_failures": len(rmetrics.get("failures", [])),
            "gen_s": t_gen, "train_s": t_train, "refit_s": t_refit,
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
            [self.prompt_ids(row) for row in self.env.dataset(4, seed=7)])
        summary["reward_before"] = self.evaluate("before GRPO")
        t_grpo = time.perf_counter()
        bar = tqdm(range(1, cfg.steps + 1), desc="grpo", unit="step", dynamic_ncols=True)
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
        summary["reward_after"] = self.evaluate("after GRPO")
        summary["reward_gain"] = summary["reward_after"] - summary["reward_before"]
        summary["total_s"] = time.perf_counter() - t_start
        if self._dist is not None:
            self._dist.close()
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary
