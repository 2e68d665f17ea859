"""Shared fixtures: a live `sglgym serve` (real SGLang on CPU, tiny model) on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

# Triton kernels only run on CPU under the interpreter; it is read when kernels are decorated.
os.environ.setdefault("TRITON_INTERPRET", "1")

API_KEY = "sglgym-test-key"
START_TIMEOUT_S = float(os.environ.get("SGLGYM_TEST_START_TIMEOUT", "420"))
LOG_DIR = Path(os.environ.get("SGLGYM_TEST_LOG_DIR", "/tmp/sglgym-test-logs"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Engine:
    base_url: str          # http://127.0.0.1:PORT (no /v1)
    api_key: str | None
    model_path: str
    process: subprocess.Popen
    log_path: Path

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
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}-{port}.log"
    cmd = [sys.executable, "-m", "sglgym.cli", "serve", "--model-path", model_path,
           "--tool-call-parser", "qwen25", "--served-model-name", "sglgym-tiny",
           "--port", str(port), "--max-total-tokens", "32768", "--log-level", "warning",
           *(["--api-key", api_key] if api_key else []), *extra_args]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    engine = Engine(f"http://127.0.0.1:{port}", api_key, model_path, proc, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"sglgym serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{engine.base_url}/health", headers=engine.headers, timeout=2).status_code == 200:
                return engine
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_engine(engine)
            raise TimeoutError(f"sglgym serve not healthy after {START_TIMEOUT_S}s:\n"
                               f"{log_path.read_text()[-4000:]}")
        time.sleep(1)


def stop_engine(engine: Engine) -> None:
    """Kill the server's whole process group (scheduler/detokenizer children included) by PID."""
    try:
        os.killpg(engine.process.pid, signal.SIGTERM)
        engine.process.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(engine.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


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
