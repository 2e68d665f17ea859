"""Megatron-core GPTModel <-> Hugging Face Qwen2: config, parameter names and layouts.

Layout differences (per decoder layer), for an unsharded (tensor-parallel size 1 or gathered) state dict:
- attention: Megatron fuses q/k/v into one `linear_qkv` [ng * (nq/ng + 2) * d, h], grouped by query
  group: for each of the ng KV groups, its nq/ng query heads, then its key head, then its value head
  (d = head dim). HF keeps three separate `q_proj` / `k_proj` / `v_proj` (same for the biases).
- MLP: Megatron fuses gate and up into `linear_fc1` = cat([gate, up]) [2 * ffn, h] (its GLU takes
  silu(first half) * second half); HF has `gate_proj` and `up_proj`.
- norms: the local spec keeps `input_layernorm` / `pre_mlp_layernorm` as modules of the layer; the
  Transformer-Engine spec fuses them into the next linear (`linear_qkv.layer_norm_weight`,
  `linear_fc1.layer_norm_weight`). Megatron -> HF reads either; HF -> Megatron writes the one asked for.
Tensor parallel shards are not a contiguous slice of the full tensor for `linear_fc1` (each rank holds
its slice of gate then its slice of up): `shard_tp` / `gather_tp` do that split and its inverse.
The vocabulary is never padded: padded rows would add logits the engine does not have and change
every logprob, so the vocab size must be divisible by the tensor-parallel size.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

NamedTensors = Iterable[tuple[str, Tensor]]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Qwen2Dims:
    """The shape facts both directions need, read from a HF Qwen2 config."""
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool

    @classmethod
    def from_hf(cls, hf_config) -> "Qwen2Dims":
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        return cls(
            num_layers=hf_config.num_hidden_layers, hidden=hf_config.hidden_size, num_heads=heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads, head_dim=head_dim,
            ffn=hf_config.intermediate_size, vocab=hf_config.vocab_size,
            tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def hf_rope_theta(hf_config) -> float:
    """rope_theta from transformers >= 5 (`rope_parameters`) or older configs (`rope_theta`)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise NotImplementedError(f"rope scaling {params.get('rope_type')!r} is not mapped to Megatron")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError("HF config has no rope_theta")
    return float(theta)


# ---------------------------------------------------------------------------------------------------------
# QKV and fc1 layouts
# ---------------------------------------------------------------------------------------------------------


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, dims: Qwen2Dims) -> Tensor:
    """HF q [nq*d, ...], k/v [ng*d, ...] -> Megatron linear_qkv [ng*(nq/ng+2)*d, ...] (weight or bias)."""
    ng, d, rest = dims.num_kv_heads, dims.head_dim, q.shape[1:]
    grouped = torch.cat([q.reshape(ng, dims.heads_per_group * d, *rest), k.reshape(ng, d, *rest),
                         v.reshape(ng, d, *rest)], dim=1)
    return grouped.reshape(-1, *rest)


def split_qkv(qkv: Tensor, dims: Qwen2Dims) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `fuse_qkv`."""
    ng, d, rest = dims.num_kv_heads, dims.head_dim, qkv.shape[1:]
    grouped = qkv.reshape(ng, (dims.heads_per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [dims.heads_per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


# ---------------------------------------------------------------------------------------------------------
# Megatron -> HF
# ---------------------------------------------------------------------------------------------------------


def strip_wrappers(name: str) -> str:
    # DDP / Float16Module wrap the GPTModel as `.module`; a state dict may carry those prefixes.
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def megatron_to_hf(named: Mapping[str, Tensor] | NamedTensors, hf_config) -> Iterator[tuple[str, Tensor]]:
    """Unsharded Megatron GPTModel parameters -> (HF Qwen2 name, tensor), one layer at a time.

    Accepts a state dict or `model.named_parameters()` (wrapper prefixes and `_extra_state` are ignored).
    Yields lazily, so a refit can bucket without holding a second full copy. Raises on any name it
    does not know, and if a layer misses a part.
    """
    dims = Qwen2Dims.from_hf(hf_config)
    items = named.items() if isinstance(named, Mapping) else named
    layers: dict[int, dict[str, Tensor]] = {}
    top: dict[str, Tensor] = {}
    for raw, t in items:
        name = strip_wrappers(raw)
        if name.endswith("_extra_state"):
            continue
        m = _LAYER.match(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = t
        else:
            top[name] = t

    if "embedding.word_embeddings.weight" in top:
        yield "model.embed_tokens.weight", top.pop("embedding.word_embeddings.weight")
    for i in sorted(layers):
        yield from _layer_to_hf(i, layers[i], dims)
    if "decoder.final_layernorm.weight" in top:
        yield "model.norm.weight", top.pop("decoder.final_layernorm.weight")
    if "output_layer.weight" in top:
        w = top.pop("output_layer.weight")
        if not dims.tied:  # a tied HF model has no lm_head tensor
            yield "lm_head.weight", w
    if top:
        raise KeyError(f"unmapped Megatron parameters: {sorted(top)}")


def _layer_to_hf(i: int, p: dict[str, Tensor], dims: Qwen2Dims) -> Iterator[tuple[str, Tensor]]:
    p = dict(p)
    pre = f"model.layers.{i}."

    def take(*names: str) -> Tensor:
        for n in names:
            if n in p:
                return p.pop(n)
        raise KeyError(f"Megatron layer {i} has none of {names}")

    yield pre + "input_layernorm.weight", take("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
    q, k, v = split_qkv(take("self_attention.linear_qkv.weight"), dims)
    yield pre + "self_attn.q_proj.weight", q
    yield pre + "self_attn.k_proj.weight", k
    yield pre + "self_attn.v_proj.weight", v
    if "self_attention.linear_qkv.bias" in p:
        qb, kb, vb = split_qkv(p.pop("self_attention.linear_qkv.bias"), dims)
        yield pre + "self_attn.q_proj.bias", qb
        yield pre + "self_attn.k_proj.bias", kb
        yield pre + "self_attn.v_proj.bias", vb
    yield pre + "self_attn.o_proj.weight", take("self_attention.linear_proj.weight")
    yield pre + "post_attention_layernorm.weight", take("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
    gate, up = torch.chunk(take("mlp.linear_fc1.weight"), 2, dim=0)
    yield pre + "mlp.gate_proj.weight", gate
    yield pre + "mlp.up_proj.weight", up
    yield pre + "mlp.down_proj.weight", take("mlp.linear_fc2.weight")
    if p:
        raise KeyError(f"unmapped Megatron parameters in layer {i}: {sorted(p)}")


# ---------------------------------------------------------------------------------------------------------
# HF -> Megatron
# ---------------------------------------------------------------------------------------------------------


def hf_to_megatron(hf: Mapping[str, Tensor], hf_config, layer_spec: str = "local") -> dict[str, Tensor]:
    """HF Qwen2 state dict -> unsharded Megatron GPTModel parameters (`layer_spec` "local" or "te")."""
    if layer_spec not in ("local", "te"):
        raise ValueError(f"layer_spec must be 'local' or 'te', got {layer_spec!r}")
    dims = Qwen2Dims.from_hf(hf_config)
    hf = {k.removeprefix("module."): v for k, v in hf.items()}
    ln_in = "input_layernorm.weight" if layer_spec == "local" else "self_attention.linear_qkv.layer_norm_weight"
    ln_mlp = "pre_mlp_layernorm.weight" if layer_spec == "local" else "mlp.linear_fc1.layer_norm_weight"
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"]}
    for i in range(dims.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        a = h + "self_attn."
        out[m + ln_in] = hf[h + "input_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = fuse_qkv(
            hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"], dims)
        if a + "q_proj.bias" in hf:
            out[m + "self_attention.linear_qkv.bias"] = fuse_qkv(
                hf[a + "q_proj.bias"], hf[a + "k_proj.bias"], hf[a + "v_proj.bias"], dims)
        out[m + "self_attention.linear_proj.weight"] = hf[a + "o_proj.weight"]
        out[m + ln_mlp] = hf[h + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc2.weight"] = hf[h + "mlp.down_proj.weight"]
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if not dims.tied:
        out["output_layer.weight"] = hf["lm_head.weight"]
    return out


# ---------------------------------------------------------------------------------------------------------
# Tensor-parallel shards
# ---------------------------------------------------------------------------------------------------------

# Parameter suffix -> dim it is split along (column-parallel: 0, row-parallel: 1); the rest is replicated.
_TP_DIM = {
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "self_attention.linear_qkv.weight": 0,   # contiguous query groups per rank (needs ng % tp == 0)
    "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,              # special: gate and up are split separately
    "mlp.linear_fc2.weight": 1,
}


def _tp_dim(name: str) -> int | None:
    for suffix, dim in _TP_DIM.items():
        if name.endswith(suffix):
            return dim
    return None


def shard_tp(full: Mapping[str, Tensor], rank: int, size: int) -> dict[str, Tensor]:
    """The parameters tensor-parallel rank `rank` of `size` holds, from an unsharded state dict."""
    out = {}
    for name, t in full.items():
        dim = _tp_dim(name)
        if dim is None or size == 1:
            out[name] = t
        elif name.endswith("mlp.linear_fc1.weight"):
            gate, up = torch.chunk(t, 2, dim=0)
            out[name] = torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]])
        else:
            if t.shape[dim] % size:
                raise ValueError(f"{name}: dim {dim} of {tuple(t.shape)} is not divisible by tp={size}")
            out[name] = t.chunk(size, dim)[rank]
    return out


def gather_tp(shards: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Inverse of `shard_tp`: per-rank state dicts (rank order) -> the unsharded one."""
    size, out = len(shards), {}
    for name, t in shards[0].items():
        dim = _tp_dim(name)
        if dim is None or size == 1:
            out[name] = t
        elif name.endswith("mlp.linear_fc1.weight"):
            halves = [torch.chunk(s[name], 2, dim=0) for s in shards]
            out[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        else:
            out[name] = torch.cat([s[name] for s in shards], dim=dim)
    return out


# ---------------------------------------------------------------------------------------------------------
# Building a megatron-core GPTModel that computes what the HF model computes
# ---------------------------------------------------------------------------------------------------------


def qwen2_transformer_config(hf_config, **overrides):
    """A megatron-core TransformerConfig for a HF Qwen2 config.

    Fusions default off (they need Apex / Transformer Engine kernels); pass overrides to turn them on,
    and for parallelism (`tensor_model_parallel_size=...`), `calculate_per_token_loss`, precision, etc.
    """
    from megatron.core.transformer import TransformerConfig

    if getattr(hf_config, "use_sliding_window", False):
        raise NotImplementedError("Qwen2 sliding-window attention is not mapped to Megatron")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise NotImplementedError(f"hidden_act {hf_config.hidden_act!r}")
    dims = Qwen2Dims.from_hf(hf_config)
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kw = dict(
        num_layers=dims.num_layers, hidden_size=dims.hidden, ffn_hidden_size=dims.ffn,
        num_attention_heads=dims.num_heads, num_query_groups=dims.num_kv_heads, kv_channels=dims.head_dim,
        normalization="RMSNorm", layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, add_qkv_bias=True,  # Qwen2: bias on q/k/v only
        hidden_dropout=0.0, attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0)),
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_gpt_from_hf(hf_config, *, layer_spec: str = "local", **config_overrides):
    """(GPTModel, TransformerConfig) with the architecture of a HF Qwen2 config (weights uninitialised
    by HF; load them with `load_hf_into_gpt`). Model parallel state must already be initialised."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    config = qwen2_transformer_config(hf_config, **config_overrides)
    dims = Qwen2Dims.from_hf(hf_config)
    if dims.vocab % config.tensor_model_parallel_size:
        raise ValueError(f"vocab {dims.vocab} not divisible by tp={config.tensor_model_parallel_size} "
                         "(padding the vocab would change every logprob)")
    if layer_spec == "local":
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    elif layer_spec == "te":
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        raise ValueError(f"layer_spec must be 'local' or 'te', got {layer_spec!r}")
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=dims.vocab,
        max_sequence_length=hf_config.max_position_embeddings, position_embedding_type="rope",
        rotary_percent=1.0, rotary_base=int(hf_rope_theta(hf_config)),
        share_embeddings_and_output_weights=dims.tied, parallel_output=True,
    )
    return model, config


def load_hf_into_gpt(model: torch.nn.Module, hf_state_dict: Mapping[str, Tensor], hf_config,
                     layer_spec: str = "local", tp_rank: int | None = None, tp_size: int | None = None) -> None:
    """Copy HF Qwen2 weights into a (possibly DDP-wrapped, tensor-parallel) GPTModel, in place.

    Every parameter of the model must be covered and every shape must match; tp rank / size default to
    megatron's parallel state.
    """
    if tp_rank is None or tp_size is None:
        from megatron.core import parallel_state
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
    local = shard_tp(hf_to_megatron(hf_state_dict, hf_config, layer_spec), tp_rank, tp_size)
    params = {strip_wrappers(n): p for n, p in model.named_parameters()}
    missing = sorted(set(params) - set(local))
    if missing:
        raise KeyError(f"no HF weight for Megatron parameters {missing}")
    with torch.no_grad():
        for name, p in params.items():
            src = local[name]
            if src.shape != p.shape:
                raise ValueError(f"{name}: HF gives {tuple(src.shape)}, model has {tuple(p.shape)}")
            p.copy_(src.to(p.dtype))


def gpt_to_hf(model: torch.nn.Module, hf_config) -> Iterator[tuple[str, Tensor]]:
    """HF-named weights of an unsharded (tp=1) GPTModel, detached (for refit or save)."""
    return megatron_to_hf(((n, p.detach()) for n, p in model.named_parameters()), hf_config)
