"""CPU stand-in for the CUDA-only `sgl_kernel` package (sglang-kernel on PyPI).

`sglgym serve` puts the folder holding this package first on PYTHONPATH for the server and the
scheduler/detokenizer processes it spawns, so SGLang's CPU engine imports these names instead of
the CUDA library (which fails to load without libcuda). Nothing is written into site-packages.
Only what SGLang's default CPU path calls is implemented; the rest raise NotImplementedError naming
the feature. `torch.ops.sgl_kernel` stays empty, so SGLang takes its torch-native layers.
"""

import torch

__version__ = "0.0.0+sglgym.cpu"


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset,
                                 out_cache_loc, pool_len=None):
    """req_to_token[req_pool_indices[i], start[i]:end[i]] = next (end[i]-start[i]) of out_cache_loc."""
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    consumed = 0
    for row, start, end in zip(rows, starts, ends):
        n = end - start
        if n > 0:
            req_to_token[row, start:end] = out_cache_loc[consumed:consumed + n].to(req_to_token.dtype)
        consumed += n


def copy_all_layer_kv_cache_cpu(*args, **kwargs):
    """Copy KV entries between slots of every layer (used when moving cached pages)."""
    # Signature in SGLang: (k_buffers, v_buffers, src_loc, tgt_loc) or with a stride argument;
    # take the first four positionally so both forms work.
    k_buffers, v_buffers, src_loc, tgt_loc = args[:4]
    src = src_loc.long()
    tgt = tgt_loc.long()
    for buf in list(k_buffers) + list(v_buffers):
        buf[tgt] = buf[src]


def _unsupported(feature: str, name: str):
    def fn(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} ({feature}) is not available in sglgym's CPU stand-in for sgl_kernel; "
            f"run on a CUDA machine with the real sglang-kernel package for {feature}."
        )
    fn.__name__ = name
    return fn


_SPECULATIVE = (
    "rotate_input_ids_cpu", "fill_accept_out_cache_loc_cpu", "fill_bonus_tokens_cpu",
    "verify_tree_greedy_cpu", "build_draft_decode_metadata_cpu", "build_tree_kernel_efficient_cpu",
    "tree_speculative_sampling_target_only_cpu", "segment_packbits_cpu", "eagle_verify_cpu",
)
for _name in _SPECULATIVE:
    globals()[_name] = _unsupported("speculative decoding", _name)


def __getattr__(name: str):
    # Any other kernel SGLang may look up lazily: fail loudly, naming it, when it is called.
    if name.startswith("__"):
        raise AttributeError(name)
    return _unsupported("a CUDA kernel", name)
