"""The GRPO loop: collect grouped rollouts -> advantages -> loss over micro-batches -> step -> refit.

Data flows one way: env -> rollout samples -> micro-batches -> loss -> weights -> engine. Every rank runs
this loop. Rank 0 drives environments and engines (`Rollouts`) and hands each rank its token-balanced
share of the step's samples; every rank trains on its share (`PolicyUpdate`, denominators over the
whole step); the weights are then pushed into every engine replica (`Refitter`) and, every `probe_every`
steps, a probe checks that each engine's logprobs equal the trainer's. Every `save_every` steps (and at
the end) a checkpoint is written; a run started with `resume_from` continues from one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

from .batches import split_over_ranks
from .checkpoint import Checkpointer
from .config import TrainConfig
from .policy import HFPolicy
from .producer import RolloutProducer, bound_staleness, overlap_s
from .ranks import Ranks
from .refitter import Refitter
from .rollouts import Rollouts
from .tracking import RunTracker
from .update import PolicyUpdate
from .warmup import prompt_ids, sft_warmup


def machine_info(device: str, world_size: int) -> dict:
    import sglang

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": device, "ranks": world_size,
            "torch": torch.__version__, "sglang": sglang.__version__, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["load_average"] = os.getloadavg()
    return info


class GRPOTrainer:
    def __init__(self, cfg: TrainConfig, policy: HFPolicy, ranks: Ranks, refitter: Refitter,
                 rollouts: Rollouts | None, tokenizer=None, resume_from: Path | None = None):
        """`rollouts` and `tokenizer` on rank 0 only; `resume_from`: a checkpoint directory (every rank)."""
        self.cfg, self.policy, self.ranks, self.refitter = cfg, policy, ranks, refitter
        self.rollouts, self.tokenizer, self.resume_from = rollouts, tokenizer, resume_from
        self.loss_cfg = cfg.loss_config()
        if cfg.max_staleness and str(policy.device) == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Generation and training now run at once on the same cores: torch's OpenMP threads spin-wait
            # when the engine takes a core (a small async step's training took 0.3 s alone and 3.1 s beside
            # generation with 2 threads), so an async CPU trainer takes half the cores.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
        if cfg.max_staleness and self.loss_cfg.tis_level is None:  # decoupled PPO needs the behaviour weight
            self.loss_cfg = dataclasses.replace(self.loss_cfg, tis_level="token")
        self.update = PolicyUpdate(policy, self.loss_cfg, ppo_epochs=cfg.ppo_epochs,
                                   micro_batch_tokens=cfg.micro_batch_tokens, proximal=cfg.max_staleness > 0)
        self.producer: RolloutProducer | None = None   # rank 0, max_staleness > 0: collects ahead
        self.out = Path(cfg.out_dir)
        self.checkpoints = Checkpointer(self.out, ranks, keep_last=cfg.keep_last)
        self.tracker: RunTracker | None = None
        if ranks.main:
            self.out.mkdir(parents=True, exist_ok=True)

    def step(self, step: int) -> dict:
        """One GRPO step on every rank; the step's metrics on rank 0 ({} elsewhere)."""
        t0 = time.perf_counter()
        batch = self._collect(step)
        if self.producer is not None:
            batch = bound_staleness(batch, self.refitter.version, self.cfg.max_staleness)
        shares = None
        if self.ranks.main and batch.samples:
            shares = self.ranks.per_rank(split_over_ranks(batch.samples, batch.advantages, self.ranks.dp_size))
        share = self.ranks.scatter(shares if shares is not None else [None] * self.ranks.world_size)
        if share is None:  # no group had reward signal: every rank skips the update
            if self.producer is not None:
                self.producer.trained_through(step)
            return {"step": step, **batch.metrics} if self.ranks.main else {}
        t1 = time.perf_counter()
        lr = self.cfg.lr_at(step)
        for group in self.policy.optimizer.param_groups:
            group["lr"] = lr
        train = {**self.update(*share), "lr": lr}
        t_train = time.perf_counter() - t1
        refit = self.refitter.refit()
        t2 = time.perf_counter()
        if self.producer is not None:
            self.producer.trained_through(step)
        probe = {}
        if self.cfg.probe_every and step % self.cfg.probe_every == 0:
            probe = self.refitter.check_agreement([s.token_ids for s in batch.samples] if self.ranks.main else None,
                                                  atol=self.cfg.probe_atol)
        if not self.ranks.main:
            return {}
        step_s = time.perf_counter() - t0
        timing = {"train_s": t_train, "step_s": step_s}
        if self.producer is not None:   # both busy: the trainer (train + refit) and the producer (generating)
            both = overlap_s(self.producer.busy_within(t0, t0 + step_s), [(t1, t2)])
            timing["overlap_frac"] = both / max(step_s, 1e-9)
        return {"step": step, **batch.metrics, **train, **refit, **probe, **timing}

    def _collect(self, step: int):
        """Rank 0 collects the step's batch (None elsewhere). An engine restarted on the way is refit by
        every rank (the weights are gathered collectively) before the step is collected again; an external
        engine that stays down ends the run with a checkpoint of the last finished step."""
        from .recovery import EngineLost

        while True:
            status, batch = "ok", None
            if self.ranks.main:
                try:
                    batch = self.producer.get(step) if self.producer is not None else self.rollouts.step_batch(step)
                    status = "refit" if batch.refit_needed else "ok"
                except EngineLost as e:
                    status, lost = "lost", e
            status = self.ranks.broadcast(status)
            if status == "ok":
                return batch
            if status == "lost":
                if self.cfg.save_every and step > 1:
                    self.save(step - 1, self.before)
                raise lost if self.ranks.main else RuntimeError("rank 0 lost its engines; see its error")
            self.refitter.refit(version=self.refitter.version)
            if self.producer is not None:
                self.producer.refit_done()

    def save(self, step: int, before: dict) -> None:
        """A checkpoint after `step` (every rank): the policy, RNG, and what rank 0 knows of the run."""
        t0 = time.perf_counter()
        state = {"weight_version": self.refitter.version, "before": before, "config": self.cfg.model_dump(),
                 "rows": self._rows_cursor(step) if self.ranks.main else None}
        path = self.checkpoints.save(step, self.policy, state)
        if self.ranks.main:
            print(f"\n[train] checkpoint {path} ({time.perf_counter() - t0:.1f}s)", flush=True)

    def _rows_cursor(self, step: int) -> dict:
        """Where the rows of step+1 start (the producer may have taken later steps' rows already)."""
        return self.producer.cursor_before(step + 1) if self.producer is not None else self.rollouts.rows.state()

    def _fresh_start(self) -> dict:
        """Warm-up, KL reference, probe and the evaluation before GRPO: what a run starts from."""
        cfg, main = self.cfg, self.ranks.main
        before: dict = {}
        warm = sft_warmup(cfg, self.policy, self.ranks, self.rollouts.envs if main else None, self.tokenizer)
        if warm:
            self.refitter.refit()
            before.update(warm)
        elif cfg.max_staleness:   # async compares token versions with ours: the engine must be at step-0 too
            self.refitter.refit(version=0)
        if self.loss_cfg.kl_type is not None:  # KL to the policy GRPO starts from (after the warm-up)
            self.policy.freeze_reference()
        probe_rows = ([prompt_ids(self.tokenizer, row) for env in self.rollouts.envs.values() for row in env.dataset(2, seed=7)]
                      if main else None)
        before["probe_before_grpo"] = self.refitter.check_agreement(probe_rows, atol=cfg.probe_atol)
        before["eval_before"] = self.rollouts.evaluate("before GRPO") if main else {}
        return before

    def _resume(self) -> tuple[int, dict]:
        """Load the checkpoint into the policy, refit every engine from it, put the data cursor back."""
        if self.loss_cfg.kl_type is not None:
            self.policy.freeze_reference()  # a module for the saved reference to load into
        state = self.checkpoints.load(self.resume_from, self.policy)
        refit = self.refitter.refit(version=state["weight_version"])
        if self.ranks.main:
            self.rollouts.rows.load_state(state["rows"])
            print(f"[train] resumed from {self.resume_from} (step {state['step']}); engines refit in "
                  f"{refit['refit_s']:.2f}s", flush=True)
        return state["step"], state["before"]

    def _grpo_steps(self, first: int, before: dict) -> int:
        from tqdm.auto import tqdm

        cfg, main = self.cfg, self.ranks.main
        t_grpo = time.perf_counter()
        bar = tqdm(range(first, cfg.steps + 1), desc="grpo", unit="step", dynamic_ncols=True, disable=not main,
                   initial=first - 1, total=cfg.steps)
        done = first - 1
        for step in bar:
            m = self.step(step)
            if main:
                self.tracker.log(m)
            done = step
            if m.get("reward_mean") is not None:
                bar.set_postfix(reward=f"{m['reward_mean']:.2f}", mismatch=f"{m.get('token_mult_prob_error', 0):.4f}")
            over = bool(cfg.time_budget_s and time.perf_counter() - t_grpo > cfg.time_budget_s)
            over = self.ranks.broadcast(over)  # rank 0's clock decides, so every rank stops at the same step
            if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps or over):
                self.save(step, before)
            if over:
                if main:
                    print(f"\n[train] time budget {cfg.time_budget_s:.0f}s reached after {step} steps", flush=True)
                break
        bar.close()
        return done

    def run(self) -> dict:
        """The whole run on every rank; the summary on rank 0 ({} elsewhere)."""
        cfg, main = self.cfg, self.ranks.main
        t_start = time.perf_counter()
        summary: dict = {"config": cfg.model_dump(), "machine": machine_info(self.policy.device, self.ranks.world_size)}
        last_step, before = self._resume() if self.resume_from else (0, self._fresh_start())
        self.before = before
        if main:
            self.tracker = RunTracker(self.out, cfg.loggers, first_step=last_step + 1, config=summary["config"],
                                      wandb_project=cfg.wandb_project, wandb_mode=cfg.wandb_mode)
        if main and cfg.max_staleness:
            self.producer = RolloutProducer(self.rollouts, last_step + 1, cfg.steps, cfg.max_staleness,
                                            lambda: self.refitter.version)
        try:
            try:
                summary["grpo_steps"] = self._grpo_steps(last_step + 1, before)
            except BaseException:
                if self.producer is not None:
                    self.producer.stop(timeout_s=5)   # a daemon thread: it ends with the process
                raise
            if self.producer is not None:
                self.producer.stop()
            after = self.rollouts.evaluate("after GRPO") if main else {}
        finally:
            self.refitter.close()
        if not main:
            return {}
        before = dict(before)
        reward_before = before.pop("eval_before")
        summary.update(before)
        summary.update(reward_before=reward_before.pop("all"), reward_after=after.pop("all"),
                       reward_before_per_env=reward_before, reward_after_per_env=after)
        summary["reward_gain"] = summary["reward_after"] - summary["reward_before"]
        summary["resumed_from"] = str(self.resume_from) if self.resume_from else None
        summary["total_s"] = time.perf_counter() - t_start
        self.tracker.summary(summary)
        self.tracker.close()
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary
