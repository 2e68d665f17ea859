"""Environment configuration: a YAML file of servers, NeMo Gym style (server name -> type, entry point,
params), with `key.path=value` overrides from the command line so nothing needs a code edit.

    guess:
      type: resources_server                 # built-in env served by our uvicorn runner
      entrypoint: sglgym.rollout.envs.guess:GuessEnv
      params: {low: 1, high: 100}            # passed to the env class (server and dataset generator)
      agent: {max_turns: 6, user_turns: true}
      dataset: {seed: 0}                     # or {jsonl: path/to/rows.jsonl}

A `nemo_gym` server instead names NeMo Gym config files and the agent to call (see nemo_gym.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SERVER_TYPES = ("resources_server", "nemo_gym")


@dataclass
class AgentConfig:
    max_turns: int = 1            # model calls per rollout
    user_turns: bool = False      # ask the env's /step for a user reply when the model calls no tool
    continue_on_length: bool = False  # a turn cut by max_tokens still gets the env's reply (weak models
                                      # rarely stop; the engine splices carried ids that lack an EOS)
    tool_timeout_s: float = 30.0
    env_timeout_s: float = 30.0   # seed_session / step / verify
    carry_token_ids: bool = True  # send each turn's ids back (the on-policy fix); false: plain messages, so
                                  # the chat template may rewrite history (drop reasoning) and the rollout
                                  # is split into a new sequence at each break (metric rollouts_split)


@dataclass
class EnvConfig:
    name: str
    type: str = "resources_server"
    entrypoint: str = ""
    params: dict = field(default_factory=dict)
    agent: AgentConfig = field(default_factory=AgentConfig)
    dataset: dict = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0                 # 0: a free port is picked at start
    startup_timeout_s: float = 60.0
    url: str | None = None        # an already running server: nothing is started
    extra: dict = field(default_factory=dict)   # type-specific keys (nemo_gym)


def parse_value(text: str) -> Any:
    """CLI values are YAML scalars/collections: 3 -> int, true -> bool, [1,2] -> list, abc -> str."""
    return yaml.safe_load(text) if text != "" else ""


def apply_override(raw: dict, override: str) -> None:
    """Apply `a.b.c=value` to the raw config dict, creating intermediate mappings."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override must look like key.path=value, got {override!r}")
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            if p in node and node[p] is not None:
                raise ValueError(f"override {override!r}: {p!r} is not a mapping")
            node[p] = {}
        node = node[p]
    node[parts[-1]] = parse_value(value)


def _env_config(name: str, raw: dict) -> EnvConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"server {name!r}: expected a mapping, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    kind = raw.pop("type", "resources_server")
    if kind not in SERVER_TYPES:
        raise ValueError(f"server {name!r}: type must be one of {SERVER_TYPES}, got {kind!r}")
    # A nemo_gym server's `agent` names NeMo Gym's agent instance; its loop limits are `agent_loop`.
    agent_raw = (raw.pop("agent_loop", None) if kind == "nemo_gym" else raw.pop("agent", None)) or {}
    unknown = set(agent_raw) - set(AgentConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"server {name!r}: unknown agent keys {sorted(unknown)}")
    known = {k: raw.pop(k) for k in list(raw) if k in ("entrypoint", "params", "dataset", "host", "port",
                                                      "startup_timeout_s", "url")}
    cfg = EnvConfig(name=name, type=kind, agent=AgentConfig(**agent_raw), extra=raw, **known)
    if kind == "resources_server" and not cfg.entrypoint and not cfg.url:
        from .envs import BUILTIN
        cfg.entrypoint = BUILTIN.get(name, "")
        if not cfg.entrypoint:
            raise ValueError(f"server {name!r}: needs an entrypoint (module:Class) or a url")
    if kind == "resources_server" and raw:
        raise ValueError(f"server {name!r}: unknown keys {sorted(raw)}")
    return cfg


# The built-in environments with their agent settings (multi-turn guess, tool-using calculator, ...).
DEFAULT_CONFIG = Path(__file__).with_name("envs.yaml")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict[str, EnvConfig]:
    """All servers of the file (the built-in `sglgym/rollout/envs.yaml` when path is None), overrides applied."""
    path = DEFAULT_CONFIG if path is None else path
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping of server names")
    for o in overrides:
        apply_override(raw, o)
    return {name: _env_config(name, body) for name, body in raw.items()}


def select(configs: dict[str, EnvConfig], names: list[str]) -> dict[str, EnvConfig]:
    """The chosen servers (comma lists allowed), in the order given; an unknown name is an error. With no
    names: every resources_server (NeMo Gym's servers start only when named: they install a venv)."""
    chosen = [n.strip() for item in names for n in item.split(",") if n.strip()] \
        or [n for n, c in configs.items() if c.type == "resources_server"]
    missing = [n for n in chosen if n not in configs]
    if missing:
        raise KeyError(f"unknown environment(s) {missing}; the config has {sorted(configs)}")
    return {n: configs[n] for n in chosen}
