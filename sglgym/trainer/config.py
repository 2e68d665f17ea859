"""`sglgym train` configuration: one pydantic model, loaded from YAML and overridable with `--set a.b=v`.

Unknown keys are refused and every value is checked against its field's type, naming the field.
"""

from __future__ import annotations

from dataclasses import fields as dc_fields
from datetime import date, datetime
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sglgym.kernels import GRPOLossConfig
from sglgym.rollout.config import apply_override

DEFAULT_LOSS = {"loss_agg": "token-mean", "eps_low": 0.2, "eps_high": 0.28}


class FSDPConfig(BaseModel):
    """Backend `fsdp` (FSDP2 `fully_shard` per decoder layer and on the root)."""
    model_config = ConfigDict(extra="forbid")
    reshard_after_forward: bool = True   # False: keep gathered parameters between forward and backward (more memory)


class MegatronConfig(BaseModel):
    """Backend `megatron` (megatron-core GPTModel from the HF checkpoint; GPU only in `sglgym train`)."""
    model_config = ConfigDict(extra="forbid")
    tp: int = Field(1, gt=0)              # tensor-parallel size (adjacent ranks); data parallel over the rest


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # model and engine
    model_path: Optional[str] = None        # None: the embedded tiny model
    engine_url: Optional[str] = None        # None: start `sglgym serve` for the run ...
    engine_urls: list[str] = []             # ... or several running replicas (all refit every step)
    engine_api_key: Optional[str] = None
    serve_args: str = ""                    # extra `sglgym serve` arguments when starting the engine
    # environment and rollouts
    env: str = "arithmetic"                 # the environment (a name in the env config) ...
    envs: dict[str, float] = {}             # ... or several mixed by weight: {arithmetic: 0.5, guess: 0.5}
    env_config: Optional[str] = None        # YAML of environments; None: the built-in sglgym/rollout/envs.yaml
    env_set: list[str] = []                 # overrides for the env config ("arithmetic.params.difficulty=2")
    group_size: int = Field(8, gt=0)
    batch_groups: int = Field(16, gt=0)
    dynamic_sampling: bool = True
    concurrency: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(8, gt=0)        # per turn
    rollout_seed: Optional[int] = None      # seeds every rollout's sampling (per step, prompt, sample, turn): with
                                            # an engine served --deterministic the run is reproducible
    # trainer backend and ranks
    backend: Literal["hf", "fsdp", "megatron"] = "hf"   # hf: one process | fsdp: FSDP2 | megatron: megatron-core
    fsdp: FSDPConfig = FSDPConfig()
    megatron: MegatronConfig = MegatronConfig()
    activation_checkpointing: bool = False
    dist_timeout_s: float = Field(1800.0, gt=0)   # every collective between trainer ranks
    # optimisation
    steps: int = Field(250, ge=0)          # GRPO steps: the run ends here (same result on a loaded machine)
    time_budget_s: Optional[float] = Field(None, gt=0)  # or stop GRPO early after this long (None: no limit)
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "linear"] = "linear"     # linear: from lr at step 1 down to
    lr_final_ratio: float = Field(0.1, ge=0, le=1)              # lr * lr_final_ratio at the last step
    max_staleness: int = Field(0, ge=0)     # async GRPO: a step trains on samples at most this many weight
                                            # versions old, generated while earlier steps train (0: synchronous)
    continue_aborted: int = Field(8, ge=0)  # async: how often one turn that a weight update aborted is continued
    ppo_epochs: int = Field(2, gt=0)        # optimizer steps per collected batch (verl ppo_epochs, TRL num_iterations)
    grad_clip: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    micro_batch_tokens: int = Field(8192, gt=0)
    advantage_baseline: Literal["mean", "loo"] = "mean"   # mean (GRPO) | loo (leave-one-out)
    advantage_std_normalize: bool = True
    loss: dict = dict(DEFAULT_LOSS)         # GRPOLossConfig fields, merged over the default
    # warm-up (supervised, on the environment's own reference answers) so a random model has signal
    sft_steps: int = Field(150, ge=0)
    sft_batch: int = Field(64, gt=0)
    sft_lr: float = Field(3e-3, gt=0)
    # refit and checks
    refit: Literal["tensor", "disk", "distributed"] = "tensor"
    refit_timeout_s: float = Field(300.0, gt=0)   # each engine call and weight-update collective of a refit
    engine_wait_s: float = Field(120.0, gt=0)     # an external engine that stops answering: wait this long, then stop
    probe_every: int = Field(10, ge=0)      # refit probe (engine vs trainer logprobs) every N steps; 0: never
    probe_atol: float = Field(1e-4, gt=0)
    eval_rows: int = Field(128, ge=0)       # held-out rows (split "test") scored before and after GRPO ...
    eval_samples: int = Field(4, gt=0)      # ... each sampled this many times at the training temperature
    # output, checkpoints and tracking
    out_dir: str = "runs/latest"
    seed: int = 0
    save_every: int = Field(25, ge=0)       # checkpoint every N GRPO steps and at the end (0: never)
    keep_last: int = Field(2, gt=0)         # checkpoints kept
    loggers: list[Literal["jsonl", "tensorboard", "wandb"]] = ["jsonl", "tensorboard"]  # metrics.jsonl is always written
    wandb_project: str = "sglgym"
    wandb_mode: Literal["online", "offline"] = "offline"   # offline: files under OUT/wandb, `wandb sync` later

    def lr_at(self, step: int) -> float:
        """The learning rate of GRPO step `step` (1-based). A function of the step alone, so a resumed run
        needs no scheduler state."""
        if self.lr_schedule == "constant" or self.steps <= 1:
            return self.lr
        done = min(max(step - 1, 0) / (self.steps - 1), 1.0)
        return self.lr * (1.0 - done * (1.0 - self.lr_final_ratio))

    @field_validator("model_path", "engine_url", "engine_api_key", "serve_args", "env", "env_config", "out_dir",
                     mode="before")
    @classmethod
    def _scalar_as_text(cls, value):
        # YAML turns `123456` into an int and `2024-01-01` into a date: a text field takes them as written
        if isinstance(value, (date, datetime)):
            return value.isoformat()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("envs")
    @classmethod
    def _positive_weights(cls, envs: dict[str, float]) -> dict[str, float]:
        for name, weight in envs.items():
            if not weight > 0:
                raise ValueError(f"envs.{name}: the weight must be > 0, got {weight!r}")
        return envs

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_fields(cls, loss) -> dict:
        if not isinstance(loss, dict):
            raise ValueError(f"expected a mapping, got {loss!r}")
        known = {f.name for f in dc_fields(GRPOLossConfig) if f.name != "temperature"}
        unknown = sorted(set(loss) - known)
        if unknown:
            raise ValueError(f"unknown loss keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        merged = {**DEFAULT_LOSS, **loss}
        typed = _loss_model(**merged)  # typed by GRPOLossConfig's fields (YAML may give `3e-1` as text)
        return {k: getattr(typed, k) for k in merged}

    def env_weights(self) -> dict[str, float]:
        """name -> share of the rows: `envs` when given (normalised), else `env` alone."""
        if not self.envs:
            return {self.env: 1.0}
        total = sum(self.envs.values())
        return {name: w / total for name, w in self.envs.items()}

    def engines(self) -> list[str]:
        """The running engines to use (empty: start one)."""
        return list(self.engine_urls) or ([self.engine_url] if self.engine_url else [])

    def loss_config(self) -> GRPOLossConfig:
        """The loss variant, its numbers typed by GRPOLossConfig's fields (YAML may give `3e-1` as text)."""
        return _loss_model(**self.loss, temperature=self.temperature)


def _loss_model(**values) -> GRPOLossConfig:
    """GRPOLossConfig built through pydantic: the loss section gets the same type checks as the rest."""
    from pydantic import TypeAdapter

    return TypeAdapter(GRPOLossConfig).validate_python(values)


def _errors(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in e.errors())


def load_train_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """The YAML at `path` (or the `base` mapping, e.g. a checkpoint's config) with the overrides applied."""
    raw: dict = dict(base or {})
    if path:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the config must be a mapping")
    for o in overrides:
        apply_override(raw, o)
    try:
        cfg = TrainConfig(**raw)
    except ValidationError as e:
        raise ValueError(_errors(e)) from None
    if cfg.engine_url and cfg.engine_urls:
        raise ValueError("engine_url, engine_urls: give one or the other, not both")
    if cfg.backend == "megatron" and cfg.loss.get("kl_type"):
        raise ValueError("loss.kl_type: a KL reference policy is not wired for backend megatron (use hf or fsdp)")
    try:
        cfg.loss_config()  # validate the loss variant now, not at step 1
    except ValidationError as e:
        raise ValueError("loss." + _errors(e)) from None
    return cfg


# keys a resumed run may change: where things run and how long, not what is trained
RESUMABLE_KEYS = ("model_path", "engine_url", "engine_urls", "engine_api_key", "serve_args", "concurrency",
                  "dist_timeout_s", "refit_timeout_s", "engine_wait_s", "steps", "time_budget_s", "probe_every", "eval_rows", "eval_samples", "out_dir",
                  "save_every", "keep_last", "loggers", "wandb_project", "wandb_mode", "continue_aborted")


def config_diff(saved: dict, current: TrainConfig) -> list[str]:
    """Dotted keys whose value differs between a checkpoint's config and this one (resumable keys aside)."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(TrainConfig(**saved).model_dump()), flat(current.model_dump())
    return sorted(k for k in a.keys() | b.keys() if k.split(".")[0] not in RESUMABLE_KEYS and a.get(k) != b.get(k))


def dump(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
