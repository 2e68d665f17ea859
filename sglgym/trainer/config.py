"""`sglgym train` configuration: one dataclass, loaded from YAML and overridable with `--set a.b=v`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from sglgym.kernels import GRPOLossConfig
from sglgym.rollout.config import apply_override


@dataclass
class TrainConfig:
    # model and engine
    model_path: str | None = None        # None: the embedded tiny model
    engine_url: str | None = None        # None: start `sglgym serve` for the run ...
    engine_urls: list[str] = field(default_factory=list)  # ... or several running replicas (all refit each step)
    engine_api_key: str | None = None
    serve_args: str = ""                 # extra `sglgym serve` arguments when starting the engine
    # environment and rollouts
    env: str = "arithmetic"              # the environment (a name in the env config) ...
    envs: dict = field(default_factory=dict)   # ... or several mixed by weight: {arithmetic: 0.5, guess: 0.5}
    env_config: str | None = None        # YAML of environments; None: the built-in sglgym/rollout/envs.yaml
    env_set: list[str] = field(default_factory=list)   # overrides for the env config ("arithmetic.params.difficulty=2")
    group_size: int = 8
    batch_groups: int = 16
    dynamic_sampling: bool = True
    concurrency: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 8                  # per turn
    # trainer backend and ranks
    backend: str = "hf"                  # hf (one process) | fsdp (FSDP2 over torchrun ranks)
    activation_checkpointing: bool = False
    dist_timeout_s: float = 1800.0       # every collective between trainer ranks (rank 0 waits on rollouts)
    # optimisation
    steps: int = 200
    time_budget_s: float | None = 480.0  # stop GRPO early when this much time has passed (None: no limit)
    lr: float = 1e-3
    ppo_epochs: int = 2                  # optimizer steps per collected batch (verl ppo_epochs, TRL num_iterations)
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    micro_batch_tokens: int = 8192
    advantage_baseline: str = "mean"     # mean (GRPO) | loo (leave-one-out)
    advantage_std_normalize: bool = True
    loss: dict = field(default_factory=lambda: {"loss_agg": "token-mean", "eps_low": 0.2, "eps_high": 0.28})
    # warm-up (supervised, on the environment's own reference answers) so a random model has signal
    sft_steps: int = 150
    sft_batch: int = 64
    sft_lr: float = 3e-3
    # refit and checks
    refit: str = "tensor"                # tensor | disk | distributed
    probe_every: int = 10                # refit probe (engine vs trainer logprobs) every N steps; 0: never
    probe_atol: float = 1e-4
    eval_rows: int = 128                 # held-out rows (split "test") scored before and after GRPO ...
    eval_samples: int = 4                # ... each sampled this many times at the training temperature
    # output
    out_dir: str = "runs/latest"
    seed: int = 0

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
        return GRPOLossConfig(temperature=self.temperature, **self.loss)


def _coerce(name: str, annotation: str, value):
    """YAML 1.1 reads `1e-3` as a string and `5` as an int where a float is meant: fix by the field's type."""
    if annotation.startswith("Optional[") and annotation.endswith("]"):
        annotation = annotation[len("Optional["):-1] + " | None"
    if value is None:
        if "None" in annotation:
            return None
        raise ValueError(f"{name}: may not be null")
    base = annotation.split("|")[0].strip()
    try:
        if base == "float" and not isinstance(value, bool):
            return float(value)
        if base == "int" and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false", "1", "0"):
                return str(value).lower() in ("true", "1")
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {base}, got {value!r}") from None
    if base == "str" and not isinstance(value, str):
        raise ValueError(f"{name}: expected str, got {value!r}")
    if base.startswith("list") and not isinstance(value, list):
        raise ValueError(f"{name}: expected a list, got {value!r}")
    if base == "dict" and not isinstance(value, dict):
        raise ValueError(f"{name}: expected a mapping, got {value!r}")
    return value


def load_train_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    raw: dict = {}
    if path:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the config must be a mapping")
    for o in overrides:
        apply_override(raw, o)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    types = {f.name: str(f.type) for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: _coerce(k, types[k], v) for k, v in raw.items()})
    if "loss" in raw:  # merged over the default loss; its numbers coerced by GRPOLossConfig's field types
        if not isinstance(raw["loss"], dict):
            raise ValueError(f"loss: expected a mapping, got {raw['loss']!r}")
        cfg.loss = {**TrainConfig().loss, **raw["loss"]}
        # the sampling temperature is one top-level value, used by both the engine and the loss
        loss_types = {f.name: str(f.type) for f in fields(GRPOLossConfig) if f.name != "temperature"}
        unknown_loss = sorted(set(cfg.loss) - set(loss_types))
        if unknown_loss:
            raise ValueError(f"unknown loss keys: {', '.join(unknown_loss)} (known: {', '.join(sorted(loss_types))})")
        cfg.loss = {k: _coerce(f"loss.{k}", loss_types[k], v) for k, v in cfg.loss.items()}
    for name in ("group_size", "batch_groups", "concurrency", "max_tokens", "micro_batch_tokens", "sft_batch",
                 "ppo_epochs", "eval_samples"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name}: must be > 0, got {getattr(cfg, name)}")
    for name in ("steps", "sft_steps", "probe_every", "eval_rows"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name}: must be >= 0, got {getattr(cfg, name)}")
    for name, weight in cfg.envs.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"envs.{name}: the weight must be a number > 0, got {weight!r}")
    cfg.envs = {str(name): float(w) for name, w in cfg.envs.items()}
    cfg.loss_config()  # validate the loss variant now, not at step 1
    if cfg.backend not in ("hf", "fsdp"):
        raise ValueError(f"backend must be hf or fsdp; got {cfg.backend!r} (megatron: see the README)")
    if cfg.engine_url and cfg.engine_urls:
        raise ValueError("give engine_url or engine_urls, not both")
    if cfg.refit not in ("tensor", "disk", "distributed"):
        raise ValueError(f"refit must be tensor, disk or distributed; got {cfg.refit!r}")
    return cfg


def dump(cfg: TrainConfig) -> str:
    return yaml.safe_dump(asdict(cfg), sort_keys=False)
