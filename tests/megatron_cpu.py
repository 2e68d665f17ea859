"""Test-only shims that let megatron-core 0.16 run its real schedule, DDP and optimizer on CPU.

Megatron assumes CUDA in a few places that have nothing to do with the math under test. They are
neutralised here, in the test process only, and undone on exit; product code never imports this file.
1. tensors created with `device="cuda"` (schedules' token counter, default causal mask, grad
   buffers' warm-up) -> a TorchFunctionMode rewrites that keyword to "cpu";
2./3. `torch.cuda.current_device()` (attention scratch buffers, rotary `inv_freq`, DDP grad buffers)
   -> returns "cpu";
4. the model-parallel RNG tracker forks CUDA RNG state -> the public inference tracker, which does not;
5. DDP / optimizer stream calls (`torch.cuda.current_stream`, `default_stream`) -> no-op streams;
6. `flash_mla` (installed with SGLang) raises OSError instead of ImportError when its CUDA library
   cannot load, which breaks megatron's optional import -> blocked so the import fails cleanly.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

from sglgym.procs import free_port


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaToCpu(TorchFunctionMode):
    """Rewrite `device="cuda..."` keyword arguments of torch calls to "cpu"."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


class _NoStream:
    """Stands in for a CUDA stream: waiting and synchronising are no-ops on CPU."""

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return None


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def megatron_on_cpu(seed: int = 1234, *, tp: int = 1, rank: int = 0, world_size: int = 1,
                    init_method: str | None = None) -> Iterator[None]:
    """A gloo world (default: 1 process) with megatron's model-parallel state, CUDA assumptions patched.

    For tensor parallelism start `world_size` processes, each with its `rank` and the same `init_method`.
    """
    blocked = "flash_mla" not in sys.modules
    if blocked:
        sys.modules["flash_mla"] = None  # `import flash_mla` now raises ImportError
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(torch.cuda, "current_device", lambda: "cpu"))
        stack.enter_context(_patched(torch.cuda, "current_stream", lambda *a, **k: _NoStream()))
        stack.enter_context(_patched(torch.cuda, "default_stream", lambda *a, **k: _NoStream()))
        stack.enter_context(CudaToCpu())
        own_pg = not torch.distributed.is_initialized()
        if own_pg:
            torch.distributed.init_process_group(
                "gloo", init_method=init_method or f"tcp://127.0.0.1:{free_port()}", rank=rank,
                world_size=world_size)
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import initialize_rng_tracker

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
            if own_pg:
                torch.distributed.destroy_process_group()
            if blocked and sys.modules.get("flash_mla", 0) is None:
                del sys.modules["flash_mla"]

