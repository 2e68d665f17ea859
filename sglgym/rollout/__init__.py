"""Rollout collection: NeMo Gym-protocol environments, spun up as subprocesses, driven by an in-process
agent loop against the engine's token route, packed into training samples with exact token ids."""

from .collector import Collector, Group, collect_batch, collect_batch_sync
from .config import AgentConfig, EnvConfig, load_config, select
from .engines import EnginePool
from .env import Env
from .errors import EnvProtocolError, RolloutError
from .samples import Sample, read_jsonl, write_jsonl
from .spinup import EnvFleet
from .tokens import ContiguityError, TokenTracker

__all__ = [
    "AgentConfig", "Collector", "ContiguityError", "EnginePool", "Env", "EnvConfig", "EnvFleet",
    "EnvProtocolError", "Group", "RolloutError", "Sample", "TokenTracker", "collect_batch",
    "collect_batch_sync", "load_config", "read_jsonl", "select", "write_jsonl",
]
