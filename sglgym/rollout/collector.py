"""Batched, grouped rollout collection.

Each dataset row is sampled `group_size` times (a GRPO group). Groups run concurrently under one limit on
in-flight rollouts and are yielded as soon as each completes (`stream_groups`). `collect_batch` consumes
that stream until it has `batch_groups` groups; with dynamic sampling it drops groups whose rewards are
all equal (no learning signal) and over-samples prompts to still fill the batch. Every finished rollout,
and every failure, is appended to a JSONL file the moment it happens, so nothing finished is lost when
something else fails or the batch is cut short.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field

import aiohttp

from .agent import LoopOptions, RolloutJob, run_rollout
from .engines import EnginePool
from .env import Env
from .errors import RolloutError
from .metrics import batch_metrics
from .samples import JsonlSink, Sample
from .transport import make_client


@dataclass
class Group:
    group_id: int
    prompt_index: int
    env: str
    samples: list[Sample] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]

    @property
    def all_equal(self) -> bool:
        return len(set(self.rewards)) <= 1


def _env_map(envs) -> dict[str, Env]:
    if isinstance(envs, Env):
        return {envs.name: envs}
    if isinstance(envs, Mapping):
        return dict(envs)
    if hasattr(envs, "envs"):        # EnvFleet
        return dict(envs.envs)
    return {e.name: e for e in envs}


def _env_for(row: dict, envs: dict[str, Env]) -> Env:
    name = (row.get("agent_ref") or {}).get("name")
    if name in envs:
        return envs[name]
    if name is None and len(envs) == 1:
        return next(iter(envs.values()))
    raise KeyError(f"row names env {name!r} (agent_ref.name), running: {sorted(envs)}")


class Collector:
    """Holds the pools and limits shared by all rollouts of a run; `stream_groups` does the work."""

    def __init__(self, envs, engines: EnginePool, *, concurrency: int = 32, opts: LoopOptions | None = None,
                 rollout_timeout_s: float = 600.0, sink: JsonlSink | None = None,
                 on_rollout: Callable[[Sample | None, dict | None], None] | None = None):
        self.envs = _env_map(envs)
        self.engines = engines
        self.concurrency = concurrency
        self.opts = opts or LoopOptions()
        self.rollout_timeout_s = rollout_timeout_s
        self.sink = sink or JsonlSink(None)
        self.on_rollout = on_rollout
        self.limit = asyncio.Semaphore(concurrency)
        self.finished: list[Sample] = []
        self.failures: list[dict] = []
        self.engine_client: aiohttp.ClientSession | None = None
        self.env_client: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Collector":
        # One bounded pool for engines, one for environments: sockets never exceed the concurrency.
        self.engine_client = make_client(self.concurrency, self.opts.engine_timeout_s)
        self.env_client = make_client(self.concurrency)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.engine_client.close()
        await self.env_client.close()

    async def _one(self, job: RolloutJob) -> tuple[Sample | None, dict | None]:
        async with self.limit:
            # NeMo Gym's own model server picks the engine of its rollouts: they take no slot of ours
            url = None if job.env.config.type == "nemo_gym" else self.engines.acquire()
            t0 = time.monotonic()
            try:
                sample = await asyncio.wait_for(
                    run_rollout(job, url, self.engines, self.engine_client, self.env_client, self.opts),
                    self.rollout_timeout_s)
                failure = None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # every failure is reported with where it happened, never dropped
                sample = None
                if isinstance(e, RolloutError):
                    stage, msg = e.stage, e.message
                elif isinstance(e, (asyncio.TimeoutError, TimeoutError)):
                    stage, msg = "timeout", f"rollout exceeded {self.rollout_timeout_s}s"
                else:
                    stage, msg = "internal", "".join(traceback.format_exception_only(type(e), e)).strip()
                failure = {"env": job.env.name, "group_id": job.group_id, "prompt_index": job.prompt_index,
                           "sample_index": job.sample_index, "stage": stage, "error": msg, "engine_url": url,
                           "elapsed_s": round(time.monotonic() - t0, 3)}
            finally:
                if url is not None:
                    self.engines.release(url)
        if sample is not None:
            self.finished.append(sample)
            self.sink.write(sample.to_dict())
        else:
            self.failures.append(failure)
            self.sink.write({"failure": failure})
        if self.on_rollout:
            self.on_rollout(sample, failure)
        return sample, failure

    async def _group(self, row: dict, prompt_index: int, group_id: int, group_size: int) -> Group:
        env = _env_for(row, self.envs)
        jobs = [RolloutJob(env, row, group_id, prompt_index, i) for i in range(group_size)]
        results = await asyncio.gather(*[self._one(j) for j in jobs])
        group = Group(group_id, prompt_index, env.name)
        for sample, failure in results:
            if sample is not None:
                group.samples.append(sample)
            else:
                group.failures.append(failure)
        group.samples.sort(key=lambda s: s.meta["sample_index"])
        return group

    async def stream_groups(self, rows: Iterable[dict], group_size: int, *,
                            groups_wanted: Callable[[], int] | int | None = None,
                            group_id_offset: int = 0) -> AsyncIterator[Group]:
        """Yield groups as they complete. `groups_wanted()` says how many groups should be in flight now
        (default: enough to keep every rollout slot busy); it is re-read after each group."""
        default = max(1, math.ceil(self.concurrency / group_size))
        if groups_wanted is None:
            wanted = lambda: default  # noqa: E731
        elif isinstance(groups_wanted, int):
            wanted = lambda: groups_wanted  # noqa: E731
        else:
            wanted = groups_wanted
        source = iter(enumerate(rows))
        pending: set[asyncio.Task] = set()
        exhausted = False
        launched = 0

        def refill() -> None:
            nonlocal exhausted, launched
            while not exhausted and len(pending) < wanted():
                try:
                    index, row = next(source)
                except StopIteration:
                    exhausted = True
                    return
                pending.add(asyncio.ensure_future(
                    self._group(row, index, group_id_offset + launched, group_size)))
                launched += 1

        try:
            refill()
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    pending.discard(task)
                for task in sorted(done, key=lambda t: t.result().group_id):
                    yield task.result()
                refill()
        finally:
            for task in pending:     # the consumer stopped early: cut the rest short
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


def _pool(engine_urls, api_key: str | None, router: bool, model: str) -> EnginePool:
    if isinstance(engine_urls, EnginePool):
        return engine_urls
    urls = [engine_urls] if isinstance(engine_urls, str) else list(engine_urls)
    if router:
        if len(urls) != 1:
            raise ValueError("router=True takes exactly one URL (the sglang-router's)")
        return EnginePool.from_router(urls[0], api_key=api_key, model=model)
    return EnginePool(urls, api_key=api_key, model=model)


async def collect_batch(envs, engine_urls, rows: Iterable[dict], group_size: int = 4, batch_groups: int = 8,
                        sampling: dict | None = None, concurrency: int = 32, dynamic_sampling: bool = False,
                        *, oversample: float = 1.5, api_key: str | None = None, router: bool = False,
                        model: str = "default", engine_timeout_s: float = 120.0, rollout_timeout_s: float = 600.0,
                        retries: int = 2, jsonl_path: str | None = None, progress: bool = True,
                        decode: Callable[[list[int]], str] | None = None, group_id_offset: int = 0,
                        requeue: Callable[[list[dict]], None] | None = None, continue_aborted: int = 0,
                        ) -> tuple[list[Sample], dict]:
    """Collect `batch_groups` complete groups of `group_size` rollouts each.

    envs: an EnvFleet, a mapping name -> Env, or Envs; each row runs on the env its agent_ref names.
    engine_urls: one URL, a list (data-parallel replicas, each rollout pinned to one), an sglang-router
        URL with router=True (its healthy workers are used, each rollout pinned to one), or an EnginePool.
    rows: NeMo Gym rows, consumed in order; with dynamic sampling (drop groups whose rewards are all
        equal) or failures, later rows replace dropped groups until the batch is full or rows run out.
    requeue: called with the rows that were neither kept, filtered nor failed (never launched, cut short
        when the batch filled, or finished after it filled), in their order, so the caller can offer them
        again: without it, dynamic sampling would favour the prompts whose rollouts finish first.
    sampling: temperature, top_p, max_tokens (per turn), optionally seed; a row's
        responses_create_params may override them.
    continue_aborted: continue a turn that an in-flight weight update aborted, up to this often (partial
        rollouts, rollout/turn.py); 0 fails it.
    Returns the samples of the kept groups and the batch metrics; the metrics' "failures" list reports
    every failed rollout. Groups come in group_id (row) order whatever order they finished in: a trainer's
    micro-batches, and so its floating-point sums, must not depend on timing (a resumed run on a loaded
    machine otherwise ends with weights 1e-8 off the uninterrupted run's).
    """
    pool = _pool(engine_urls, api_key, router, model)
    rows = list(rows)
    opts = LoopOptions(sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 64, **(sampling or {})},
                       engine_timeout_s=engine_timeout_s, retries=retries, decode=decode,
                       continue_aborted=continue_aborted)
    sink = JsonlSink(jsonl_path)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=batch_groups * group_size, desc="rollouts", unit="sample", dynamic_ncols=True)
    kept: list[Group] = []
    filtered = failed = 0
    decided: set[int] = set()    # prompt_index of every group kept, filtered or failed
    t0 = time.monotonic()

    def groups_wanted() -> int:
        need = batch_groups - len(kept)
        return max(0, math.ceil(need * (oversample if dynamic_sampling else 1.0)))

    collector = Collector(envs, pool, concurrency=concurrency, opts=opts, rollout_timeout_s=rollout_timeout_s,
                          sink=sink)
    try:
        async with collector:
            stream = collector.stream_groups(rows, group_size, groups_wanted=groups_wanted,
                                             group_id_offset=group_id_offset)
            async with contextlib.aclosing(stream):
                async for group in stream:
                    decided.add(group.prompt_index)
                    if not group.ok:
                        failed += 1
                    elif dynamic_sampling and group.all_equal:
                        filtered += 1
                    else:
                        kept.append(group)
                        if bar:
                            bar.update(len(group.samples))
                    if bar:
                        bar.set_postfix(filtered=filtered, failed=len(collector.failures),
                                        reward=round(sum(s.reward for g in kept for s in g.samples)
                                                     / max(1, sum(len(g.samples) for g in kept)), 3))
                    if len(kept) >= batch_groups:
                        break
    finally:
        sink.close()
        if bar:
            bar.close()
    wall = time.monotonic() - t0
    samples = [s for g in sorted(kept, key=lambda g: g.group_id) for s in g.samples]
    groups_done = len(kept) + filtered + failed
    cancelled = max(0, len({s.group_id for s in collector.finished} | {f["group_id"] for f in collector.failures})
                    - groups_done)
    metrics = batch_metrics(samples, wall_s=wall, finished=collector.finished, failures=collector.failures,
                            groups_kept=len(kept), groups_filtered=filtered, groups_failed=failed,
                            groups_cancelled=cancelled, engine_assigned=pool.assigned)
    metrics["batch_full"] = len(kept) >= batch_groups
    leftover = [row for i, row in enumerate(rows) if i not in decided]
    metrics["rows_requeued"] = len(leftover) if requeue is not None else 0
    if requeue is not None and leftover:
        requeue(leftover)
    metrics["failures"] = list(collector.failures)
    return samples, metrics


def collect_batch_sync(*args, **kwargs) -> tuple[list[Sample], dict]:
    """`collect_batch` for synchronous callers (runs its own event loop)."""
    return asyncio.run(collect_batch(*args, **kwargs))
