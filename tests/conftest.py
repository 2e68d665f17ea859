"""Shared fixtures: a live `sglgym serve` (real SGLang on CPU, tiny model) on a free loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sglgym.procs import ServerProcess, free_port, start_process, stop_process, wait_healthy

# Triton kernels only run on CPU under the interpreter; it is read when kernels are decorated.
os.environ.setdefault("TRITON_INTERPRET", "1")

API_KEY = "sglgym-test-key"
START_TIMEOUT_S = float(os.environ.get("SGLGYM_TEST_START_TIMEOUT", "420"))
LOG_DIR = Path(os.environ.get("SGLGYM_TEST_LOG_DIR", "/tmp/sglgym-test-logs"))


@dataclass
class Engine:
    base_url: str          # http://127.0.0.1:PORT (no /v1)
    api_key: str | None
    model_path: str
    server: ServerProcess

    @property
    def process(self) -> subprocess.Popen:
        return self.server.process

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=kw.pop("timeout", 120), **kw)


def start_engine(name: str, extra_args: list[str] = (), api_key: str | None = API_KEY) -> Engine:
    """Start `sglgym serve` in its own process group; wait for /health with a timeout."""
    from sglgym.models import build_tiny_model

    model_path = str(build_tiny_model())
    port = free_port()
    cmd = [sys.executable, "-m", "sglgym.cli", "serve", "--model-path", model_path,
           "--tool-call-parser", "qwen25", "--served-model-name", "sglgym-tiny",
           "--port", str(port), "--max-total-tokens", "32768", "--log-level", "warning",
           *(["--api-key", api_key] if api_key else []), *extra_args]
    server = start_process(name, cmd, f"http://127.0.0.1:{port}", log_dir=LOG_DIR)
    engine = Engine(server.url, api_key, model_path, server)
    wait_healthy(server, START_TIMEOUT_S, headers=engine.headers)   # stops it and raises on exit / timeout
    return engine


def stop_engine(engine: Engine) -> None:
    """Kill the server's whole tree (scheduler/detokenizer children included) by PID."""
    stop_process(engine.server, grace_s=20)


@pytest.fixture(scope="session")
def engine():
    eng = start_engine("engine", ["--enable-metrics"])   # /metrics: tests count the requests it served
    yield eng
    stop_engine(eng)


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from sglgym.models import build_tiny_model
    return str(build_tiny_model())


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture
def control(engine):
    from sglgym.trainer.refit import EngineControl

    c = EngineControl(engine.base_url, engine.api_key)
    yield c
    c.close()


@pytest.fixture
def restore_engine(control, tiny_model_path):
    """Give the shared engine its original weights back, and check it really has them."""
    from sglgym.trainer.policy import HFPolicy
    from sglgym.trainer.refit import probe, refit_from_tensor

    base = HFPolicy(tiny_model_path)
    version = control.weight_version()
    yield base
    refit_from_tensor(control, base.named_tensors(), version=version or "base")
    seqs = [[1, 5, 9, 13, 17, 21]]
    restored = probe(control, lambda s: base.score(s), seqs)
    assert restored.ok, restored
