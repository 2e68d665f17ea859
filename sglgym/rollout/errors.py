"""Why a rollout failed, with where it failed (so a report can say which server to look at)."""

from __future__ import annotations


class RolloutError(Exception):
    """A rollout that could not finish. `stage`: engine, seed_session, tool, step, verify, contiguity,
    timeout, env_protocol, row (a malformed dataset row), run (NeMo Gym's agent /run), context (a prompt longer
    than the engine's context), internal."""

    def __init__(self, stage: str, message: str, url: str | None = None):
        super().__init__(f"[{stage}] {message}")
        self.stage, self.message, self.url = stage, message, url


class EnvProtocolError(RolloutError):
    """An environment answered something that is not the protocol (non-JSON, missing reward, ...)."""

    def __init__(self, message: str, url: str | None = None):
        super().__init__("env_protocol", message, url)
