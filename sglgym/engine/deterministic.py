"""`sglgym serve --deterministic`: SGLang's deterministic inference, on GPU and on our CPU engine.

SGLang honours a request's `sampling_seed` (our chat `seed`) only with `--enable-deterministic-inference`:
the sampler then draws token t of a request as argmax(logprobs + Gumbel noise), the noise hashed from
(seed, position, vocabulary index), and batch-invariant kernels make the logprobs themselves independent
of which other requests share the batch. A request sent without a seed gets SGLang's default seed 42.

On GPU `--deterministic` only adds `--enable-deterministic-inference`. SGLang 0.5.23 cannot run that flag
on CPU; four gaps, each closed here with the least change we found:

1. The flag refuses `--attention-backend torch_native`, the only CPU backend. That backend runs
   `scaled_dot_product_attention` on each request's own query/keys/values, in a loop over the requests
   of the batch, so a request's attention never depends on the others. We add it to SGLang's list
   with SGLang's own hook for out-of-tree platforms (`add_deterministic_attention_backend_choices`).
   The radix cache stays off, as SGLang decides for every backend outside its radix-safe list.
2. Seeded sampling calls `torch.ops.sgl_kernel.murmur_hash32_cpu`, which only the real CPU build of
   sgl_kernel provides (our `cpu_shim` stand-in does not). We register that op with a torch
   implementation equal bit for bit to SGLang's Triton `murmur_hash32_kernel`, so a seed draws the same
   noise on CPU and GPU.
3. `ModelRunner.maybe_enable_batch_invariant_mode` calls SGLang's `enable_batch_invariant_mode()`,
   which raises on CPU ("No supported accelerator") and whose kernels are Triton/CUDA. It is needed:
   MKL's sgemm gives a row a different result depending on how many rows share the call (measured on
   this project's CPU runner: M=1, M=2..3 and M>=4 are three classes, and with 2 threads the parity of
   M matters too), so a request's logits would change with the batch. In the scheduler process we
   replace that method with a CPU mode that overrides `aten::mm` / `aten::addmm` on the CPU dispatch
   key: every matmul runs as a loop of calls of one fixed shape, `BLOCK_ROWS` zero-padded rows each, so
   the BLAS takes the same path whatever the batch. A row's result could still depend on its position
   in the block, so the first matmul of each weight layout is probed (each of `BLOCK_ROWS` rows at
   every position); a layout that fails the probe is computed one row at a time instead (logged).
   Everything else on the CPU path is row-wise (norms, softmax, rotary, activations) or per request
   (attention).
4. Chunked prefill is turned off on CPU (`CPU_DEFAULTS`, unless either flag is given). torch_native
   computes a prefill chunk's attention with as many query rows as the request has tokens so far, and
   CPU SDPA's result for a row changes with that count (measured: the rows of a causal call of length
   500 differ by up to 3e-8 from the same rows in a call of length 2000); where a prompt gets cut depends on what else is in the prefill batch,
   so a seeded request's logprobs changed when long prompts came with it. Unchunked, every prompt is
   prefilled in one piece, up to 4096 new tokens per prefill batch (as the 4096-token chunks allowed;
   a longer prompt runs alone). `--max-prefill-tokens` is given too: SGLang sizes its activation
   reserve from it when chunking is off, and its 16384 default leaves no memory on a small machine.

Not covered: a request that SGLang retracts when the KV pool runs out is prefilled again with its
generated tokens, in one attention call instead of one per decode step, so its later tokens may
change; keep `--max-total-tokens` above the concurrent load.

Steps 2-3 must run in SGLang's scheduler process (spawned, so nothing patched here reaches it): `run_server`
passes `run_scheduler_process` below to SGLang's `launch_server` through its `run_scheduler_process_func`
parameter, SGLang's extension point for launching its processes from a private entry point.
"""

from __future__ import annotations

import logging
import threading

import torch

logger = logging.getLogger(__name__)

SGLANG_FLAG = "--enable-deterministic-inference"
CPU_BACKEND = "torch_native"
CPU_DEFAULTS = {"--chunked-prefill-size": "-1", "--max-prefill-tokens": "4096"}   # see 4. above
BLOCK_ROWS = 32   # rows per BLAS call in the CPU batch-invariant matmul (decode batches up to 32: one call)


# ---------------------------------------------------------------- main process

def allow_cpu_attention_backend() -> None:
    """Let SGLang's deterministic mode accept torch_native attention (idempotent; before resolution)."""
    from sglang.srt.arg_groups.choices import (
        DETERMINISTIC_ATTENTION_BACKEND_CHOICES,
        add_deterministic_attention_backend_choices,
    )
    if CPU_BACKEND not in DETERMINISTIC_ATTENTION_BACKEND_CHOICES:
        add_deterministic_attention_backend_choices([CPU_BACKEND])


def run_server(server_args) -> None:
    """SGLang's default HTTP server (sglang.launch_server.run_server's last branch), with our scheduler entry."""
    from sglang.srt.arg_groups.overrides import resolving_view
    from sglang.srt.entrypoints.http_server import launch_server

    server_args.resolve_once()
    cfg = resolving_view(server_args)
    if cfg.encoder_only or cfg.smg_grpc_mode or cfg.use_ray:
        raise SystemExit("sglgym serve --deterministic on CPU serves plain HTTP only "
                         "(not --encoder-only, --grpc-mode/--smg-grpc-mode or --use-ray)")
    launch_server(server_args, run_scheduler_process_func=run_scheduler_process)


# ---------------------------------------------------------------- scheduler process

def run_scheduler_process(*args, **kwargs):
    """SGLang's scheduler process entry, after the CPU adaptations (module-level: spawn pickles it by name)."""
    install_scheduler_support()
    from sglang.srt.managers.scheduler import run_scheduler_process as sglang_run_scheduler_process
    return sglang_run_scheduler_process(*args, **kwargs)


def install_scheduler_support() -> None:
    allow_cpu_attention_backend()
    register_murmur_hash32_cpu()
    from sglang.srt.model_executor.model_runner import ModelRunner
    original = ModelRunner.maybe_enable_batch_invariant_mode
    if getattr(original, "_sglgym_cpu", False):
        return

    def maybe_enable_batch_invariant_mode(self):
        from sglang.srt.runtime_context import get_exec
        if get_exec().deterministic.enable_deterministic_inference and str(self.device) == "cpu":
            enable_cpu_batch_invariant_mode()
        else:
            original(self)

    maybe_enable_batch_invariant_mode._sglgym_cpu = True
    ModelRunner.maybe_enable_batch_invariant_mode = maybe_enable_batch_invariant_mode


# ---------------------------------------------------------------- murmur hash (sgl_kernel::murmur_hash32_cpu)

_M32 = 0xFFFFFFFF
_LIB: torch.library.Library | None = None


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) | (x >> (32 - r))) & _M32


def _mix(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    k = _rotl32(_mul32(k, 0xCC9E2D51), 15)
    k = _mul32(k, 0x1B873593)
    h = _rotl32(h ^ k, 13)
    return (_mul32(h, 5) + 0xE6546B64) & _M32


def murmur_hash32_reference(seed: torch.Tensor, positions: torch.Tensor, col_indices: torch.Tensor) -> torch.Tensor:
    """uint32 [n, m]: MurmurHash3 of (seed lo, seed hi, position, column), as SGLang's Triton kernel."""
    seed = seed.to(torch.int64)      # uint64 seeds arrive as their two's-complement bits
    lo = (seed & _M32).view(-1, 1)
    hi = ((seed >> 32) & _M32).view(-1, 1)
    pos = (positions.to(torch.int64) & _M32).view(-1, 1)
    col = (col_indices.to(torch.int64) & _M32).view(1, -1)
    h = torch.zeros_like(lo)
    h = _mix(h, lo)
    h = _mix(h, hi)
    h = _mix(h, pos)
    h = _mix(h, col)                 # broadcasts to [n, m]
    h = h ^ 16
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    h = h ^ (h >> 16)
    return h.to(torch.uint32)


def register_murmur_hash32_cpu() -> None:
    """Define `torch.ops.sgl_kernel.murmur_hash32_cpu` unless a real sgl_kernel CPU build already did."""
    global _LIB
    if _LIB is not None or hasattr(torch.ops.sgl_kernel, "murmur_hash32_cpu"):
        return
    lib = torch.library.Library("sgl_kernel", "FRAGMENT")
    lib.define("murmur_hash32_cpu(Tensor seed, Tensor positions, Tensor col_indices) -> Tensor")
    lib.impl("murmur_hash32_cpu", murmur_hash32_reference, "CPU")
    _LIB = lib


# ---------------------------------------------------------------- CPU batch-invariant matmul

_BI_LIB: torch.library.Library | None = None
_layouts: dict[tuple, int] = {}     # weight layout -> rows per call (BLOCK_ROWS, or 1 if the probe failed)
_layouts_lock = threading.Lock()


def _blocked_mm(a: torch.Tensor, b: torch.Tensor, rows: int) -> torch.Tensor:
    """a @ b as calls of exactly `rows` rows (zero-padded copies), through aten::mm.out (not overridden)."""
    m, k = a.shape
    n = b.shape[1]
    dtype = torch.promote_types(a.dtype, b.dtype)
    padded = -(-m // rows) * rows
    src = torch.zeros((padded, k), dtype=a.dtype)   # fresh: same alignment and strides on every call
    src[:m] = a
    out = torch.empty((padded, n), dtype=dtype)
    for s in range(0, padded, rows):
        torch.mm(src[s:s + rows], b, out=out[s:s + rows])
    return out[:m]


def _rows_for(b: torch.Tensor, a_dtype: torch.dtype) -> int:
    key = (tuple(b.shape), tuple(b.stride()), b.dtype, a_dtype, torch.get_num_threads())
    rows = _layouts.get(key)
    if rows is None:
        with _layouts_lock:
            rows = _layouts.get(key)
            if rows is None:
                rows = BLOCK_ROWS if _position_invariant(b, a_dtype, BLOCK_ROWS) else 1
                if rows == 1:
                    logger.warning("CPU batch-invariant matmul: a row's result depends on its position in a "
                                   "%d-row call for weight %s; computing it one row at a time", BLOCK_ROWS, key)
                _layouts[key] = rows
    return rows


def _position_invariant(b: torch.Tensor, a_dtype: torch.dtype, rows: int) -> bool:
    """Does each row of a `rows`-row call come out the same at every position of the call?"""
    g = torch.Generator().manual_seed(0)
    x = torch.randn((rows, b.shape[0]), generator=g).to(a_dtype)
    ref = _blocked_mm(x, b, rows)
    for shift in range(1, rows):
        out = _blocked_mm(torch.roll(x, shift, 0), b, rows)
        if not torch.equal(torch.roll(out, -shift, 0), ref):
            return False
    return True


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] == 0 or not a.dtype.is_floating_point:
        return torch.mm(a, b, out=torch.empty((a.shape[0], b.shape[1]), dtype=torch.promote_types(a.dtype, b.dtype)))
    return _blocked_mm(a, b, _rows_for(b, a.dtype))


def _addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    out = _mm(a, b)
    if alpha != 1:
        out.mul_(alpha)
    if beta != 0:
        out.add_(bias, alpha=beta)
    return out


def enable_cpu_batch_invariant_mode() -> None:
    """Override aten::mm / aten::addmm on CPU in this process with the fixed-block versions above."""
    global _BI_LIB
    if _BI_LIB is not None:
        return
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("mm", _mm, "CPU")
    lib.impl("addmm", _addmm, "CPU")
    _BI_LIB = lib
    logger.info("CPU batch-invariant matmul on (aten::mm, aten::addmm in %d-row blocks)", BLOCK_ROWS)


def disable_cpu_batch_invariant_mode() -> None:
    global _BI_LIB
    if _BI_LIB is not None:
        _BI_LIB._destroy()
        _BI_LIB = None
        _layouts.clear()
