"""Weight refit: push the trainer's weights into the running SGLang engine, then probe agreement.

Three paths, all over SGLang's own control endpoints:
- disk: save safetensors, `POST /update_weights_from_disk` (no session needed);
- tensor: `POST /update_weights_from_tensor` with pickled CPU tensors in buckets;
- distributed: the trainer joins one process group with every engine replica (`/init_weights_update_group`
  at rank offsets; NCCL on GPU, gloo on CPU) and broadcasts each bucket once while
  `/update_weights_from_distributed` is in flight on every engine.
SGLang 0.5.23 only accepts tensor/distributed updates inside begin/end_weight_update; every refit is
also wrapped in pause(retract) -> flush cache -> update -> continue so in-flight requests finish on the
new weights, and it bumps the weight version the engine reports in `meta_info`.
"""

from __future__ import annotations

import base64
import pickle
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field

import httpx
import torch

from sglgym.procs import free_port

NamedTensors = list[tuple[str, torch.Tensor]]


class RefitError(RuntimeError):
    """A refit step that failed or did not answer in time, naming the engine and the phase (pause, flush,
    init_group, update, broadcast, continue, probe, close)."""

    def __init__(self, engine_url: str, phase: str, detail: str):
        super().__init__(f"refit of {engine_url}: phase {phase!r}: {detail}")
        self.engine_url, self.phase = engine_url, phase


PHASES = {"/pause_generation": "pause", "/flush_cache": "flush", "/continue_generation": "continue",
          "/init_weights_update_group": "init_group", "/destroy_weights_update_group": "close",
          "/generate": "probe"}


@dataclass
class EngineControl:
    """HTTP client for one engine's control endpoints; every call times out after `timeout_s`."""
    base_url: str
    api_key: str | None = None
    timeout_s: float = 300.0
    _client: httpx.Client | None = field(default=None, repr=False)

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.Client(base_url=self.base_url.rstrip("/"), headers=headers, timeout=self.timeout_s)
        return self._client

    def request(self, path: str, body: dict | None = None) -> httpx.Response:
        """POST, with a transport error or a timeout raised as a RefitError naming the phase."""
        try:
            try:
                return self.client.post(path, json=body or {})
            except (httpx.RemoteProtocolError, httpx.ConnectError):
                self.close()  # a pooled connection to an engine process that is gone: once more, afresh
                return self.client.post(path, json=body or {})
        except httpx.TimeoutException:
            raise RefitError(self.base_url, PHASES.get(path, "update"),
                             f"{path} did not answer within {self.timeout_s:.0f}s") from None
        except httpx.HTTPError as e:
            raise RefitError(self.base_url, PHASES.get(path, "update"), f"{path}: {e!r}") from None

    def post(self, path: str, body: dict | None = None) -> dict:
        r = self.request(path, body)
        phase = PHASES.get(path, "update")
        if r.status_code != 200:
            raise RefitError(self.base_url, phase, f"{path} -> {r.status_code}: {r.text[:500]}")
        try:
            out = r.json()
        except ValueError:
            return {}
        if isinstance(out, dict) and out.get("success") is False:
            raise RefitError(self.base_url, phase, f"{path} failed: {out.get('message')}")
        return out if isinstance(out, dict) else {}

    def model_info(self) -> dict:
        return self.client.get("/model_info").json()

    def weight_version(self) -> str | None:
        return self.model_info().get("weight_version")

    @contextmanager
    def paused(self):
        """Pause generation (in-flight requests are retracted and resumed later), flush, continue."""
        self.post("/pause_generation", {"mode": "retract"})
        try:
            self.post("/flush_cache")
            yield
        except BaseException:
            with suppress(RefitError):  # the first error is the one to report
                self.post("/continue_generation")
            raise
        self.post("/continue_generation")

    @contextmanager
    def weight_update_session(self):
        try:
            self.post("/begin_weight_update")
        except RefitError as e:
            if "already open" not in str(e):
                raise
            # a trainer killed mid-refit left its session open (and the engine paused: `paused` continues it)
            self.post("/end_weight_update")
            self.post("/begin_weight_update")
        try:
            yield
        finally:
            self.post("/end_weight_update")

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Engine logprob of every token after the first, teacher-forced (a 1-token generate per sequence)."""
        body = {"input_ids": sequences, "return_logprob": True, "logprob_start_len": 0,
                "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
        r = self.request("/generate", body)
        if r.status_code != 200:
            raise RefitError(self.base_url, "probe", f"/generate -> {r.status_code}: {r.text[:500]}")
        outs = r.json()
        return [[float(lp) for lp, _tid, *_ in o["meta_info"]["input_token_logprobs"][1:]] for o in outs]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[NamedTensors]:
    """Group tensors into buckets of about `bucket_bytes` (one tensor may exceed it alone)."""
    bucket, size = [], 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def refit_from_tensor(engine: EngineControl, named: Iterable[tuple[str, torch.Tensor]], version: str,
                      bucket_bytes: int = 256 << 20) -> float:
    """Send CPU tensors over HTTP (a plain pickle, base64): works across processes and machines.

    SGLang's default serializer shares file descriptors, which only works inside one host's process
    tree and kills a CPU server from another process; a plain pickle avoids that.
    """
    t0 = time.perf_counter()
    with engine.paused(), engine.weight_update_session():
        for bucket in buckets(named, bucket_bytes):
            payload = pickle.dumps([(n, t.detach().to("cpu").contiguous()) for n, t in bucket])
            engine.post("/update_weights_from_tensor", {
                "serialized_named_tensors": [base64.b64encode(payload).decode()],
                "weight_version": version, "flush_cache": False,
            })
    return time.perf_counter() - t0


class DistributedRefit:
    """Trainer side of one weight-update process group with every engine replica: the trainer is rank 0,
    engine i (with `engine_world_sizes[i]` ranks: its TP size) joins at a rank offset after the engines
    before it, so each bucket is broadcast once and reaches every replica. The group's collectives and every
    engine call time out after the engines' `timeout_s`."""

    def __init__(self, engines: EngineControl | list[EngineControl], engine_world_sizes: list[int] | None = None,
                 backend: str | None = None, master_address: str = "127.0.0.1", master_port: int | None = None,
                 group_name: str = "sglgym_refit"):
        import datetime

        self.engines = [engines] if isinstance(engines, EngineControl) else list(engines)
        sizes = engine_world_sizes or [1] * len(self.engines)
        self.group_name, self.timeout_s = group_name, max(e.timeout_s for e in self.engines)
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.device = "cuda" if self.backend == "nccl" else "cpu"
        port = master_port or free_port()
        world = 1 + sum(sizes)
        offsets = [1 + sum(sizes[:i]) for i in range(len(self.engines))]
        # Each engine joins inside its HTTP handler: every request must be in flight while we join.
        calls = [self._in_flight(e, "/init_weights_update_group",
                                 {"master_address": master_address, "master_port": port, "rank_offset": offset,
                                  "world_size": world, "group_name": group_name, "backend": self.backend})
                 for e, offset in zip(self.engines, offsets)]
        from sglang.srt.utils import init_custom_process_group
        try:
            self.group = init_custom_process_group(
                backend=self.backend, init_method=f"tcp://{master_address}:{port}", world_size=world, rank=0,
                group_name=group_name, timeout=datetime.timedelta(seconds=self.timeout_s))
        except Exception as e:  # the rendezvous timed out: an engine never joined
            raise RefitError(self._urls, "init_group", f"not every engine joined the group: {e}") from None
        self._finish(calls, "init_group")

    @property
    def _urls(self) -> str:
        return ", ".join(e.base_url for e in self.engines)

    @staticmethod
    def _in_flight(engine: EngineControl, path: str, body: dict) -> tuple[EngineControl, threading.Thread, list]:
        errors: list[Exception] = []

        def call() -> None:
            try:
                engine.post(path, body)
            except Exception as e:  # surfaced by _finish
                errors.append(e)

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        return engine, thread, errors

    def _finish(self, calls: list[tuple[EngineControl, threading.Thread, list]], phase: str) -> None:
        for engine, thread, errors in calls:
            thread.join(self.timeout_s + 5)  # the HTTP call itself times out first
            if thread.is_alive():
                raise RefitError(engine.base_url, phase, f"no answer within {self.timeout_s:.0f}s")
            if errors:
                raise errors[0]

    def update(self, named: Iterable[tuple[str, torch.Tensor]], version: str,
               bucket_bytes: int = 512 << 20) -> float:
        t0 = time.perf_counter()
        with ExitStack() as held:
            for engine in self.engines:   # every replica paused, flushed and in a weight-update session
                held.enter_context(engine.paused())
                held.enter_context(engine.weight_update_session())
            for bucket in buckets(named, bucket_bytes):
                body = {"names": [n for n, _ in bucket],
                        "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                        "shapes": [list(t.shape) for _, t in bucket],
                        "group_name": self.group_name, "weight_version": version, "flush_cache": False}
                calls = [self._in_flight(e, "/update_weights_from_distributed", body) for e in self.engines]
                try:
                    for _, t in bucket:  # same order as `names`: the engines receive them one by one
                        torch.distributed.broadcast(t.detach().to(self.device).contiguous(), src=0, group=self.group)
                except RuntimeError as e:  # the group's timeout: an engine stopped receiving
                    raise RefitError(self._urls, "broadcast", str(e)[:500]) from None
                self._finish(calls, "update")
        return time.perf_counter() - t0

    def close(self) -> None:
        try:
            for engine in self.engines:
                with suppress(RefitError):   # a restarted engine is in no group
                    engine.post("/destroy_weights_update_group", {"group_name": self.group_name})
        finally:
            torch.distributed.destroy_process_group(self.group)


@dataclass
class ProbeResult:
    max_abs_diff: float
    mean_abs_diff: float
    tokens: int
    ok: bool

    def __str__(self) -> str:
        state = "agree" if self.ok else "DIVERGE"
        return (f"refit probe: engine and trainer {state} (max |dlogprob| {self.max_abs_diff:.2e}, "
                f"mean {self.mean_abs_diff:.2e}, {self.tokens} tokens)")


def probe(engine: EngineControl, trainer_logprobs_fn, sequences: list[list[int]], atol: float = 1e-4) -> ProbeResult:
    """Compare the engine's teacher-forced logprobs with the trainer's on the same sequences.

    `trainer_logprobs_fn(sequences) -> list[list[float]]` gives the logprob of each token after the first.
    """
    engine_lps = engine.score(sequences)
    trainer_lps = trainer_logprobs_fn(sequences)
    diffs = []
    for e, t in zip(engine_lps, trainer_lps):
        if len(e) != len(t):
            raise RefitError(engine.base_url, "probe", f"length mismatch: engine {len(e)} vs trainer {len(t)}")
        diffs += [abs(a - b) for a, b in zip(e, t)]
    max_d = max(diffs) if diffs else 0.0
    return ProbeResult(max_d, sum(diffs) / max(len(diffs), 1), len(diffs), max_d <= atol)
