"""The GRPO loss as a megatron-core `forward_step`, for `get_forward_backward_func()`.

    totals = step_totals(micro_batches, dp_group=parallel_state.get_data_parallel_group())
    forward_step = make_forward_step(GRPOLossConfig(...), totals)
    forward_backward_func(forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
                          num_microbatches=len(micro_batches), seq_length=..., micro_batch_size=...)

The data iterator yields `sglgym.trainer.batches.MicroBatch`es (padded [B, L] model input, packed loss rows).

Reduction, so one optimizer step equals the GRPO loss over the whole step's batch:
- every micro-batch's loss is computed with the *step's* denominators (`StepTotals`: loss tokens,
  sequences, longest sequence, summed over every micro-batch on every data-parallel rank), so the
  micro-batch losses add up to the whole-batch loss L for every `loss_agg`;
- `loss_func` returns `(L_mb * N, n_mb, metrics)` with N the step's loss-token count and n_mb this
  micro-batch's; this needs `TransformerConfig.calculate_per_token_loss=True`: then the schedule does
  not divide the loss, megatron DDP sums (not averages) gradients over data-parallel ranks, and
  `finalize_model_grads` divides them by sum(n_mb) = N. The gradient is exactly dL/dθ.
  (With calculate_per_token_loss=False the schedule would divide by n_mb and by num_microbatches
  and DDP would average: `forward_step` refuses that config rather than train on a wrong scale.)
- So the model must be wrapped in megatron's `DistributedDataParallel` (or have a
  `config.finalize_model_grads_func` that divides by the token count) and `config.finalize_model_grads_func`
  must be set (`megatron.core.distributed.finalize_model_grads`), as megatron's own training loop does.
- Metrics come as `{name: tensor([value * n_mb, n_mb])}`: summing them over micro-batches and ranks and
  dividing gives the step's token mean (and "loss" gives L), the way megatron's training loop reduces them.
  min/max metrics do not reduce that way and are left out.

Tensor parallel: the model's output layer is vocab-parallel (GPTModel(parallel_output=True)); the
logits [B, L, V/tp] go straight into `sglgym.kernels.grpo_loss` with the tensor-parallel group, which
never gathers the vocabulary. Context parallelism is not supported (the loss needs whole sequences).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import Tensor

from sglgym.kernels import GRPOLossConfig, grpo_loss, token_logprobs
from sglgym.trainer.batches import MicroBatch
from sglgym.trainer.totals import StepTotals, step_loss_config, step_totals  # noqa: F401 (re-exported)

# Token-mean metrics of `grpo_loss` that reduce as [value * n, n]; ratio_min / ratio_max do not.
MEAN_METRICS = ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "ratio_mean", "kl_mean",
                "token_mult_prob_error", "tis_weight_mean")


def loss_func(mb: MicroBatch, cfg: GRPOLossConfig, totals: StepTotals, tp_group, backend: str,
              output_tensor: Tensor, non_loss_data: bool = False):
    """Megatron loss function for one micro-batch; `output_tensor` = logits [B, L, V(/tp)].

    Returns (L_mb * N, n_mb, metrics) -- see the module docstring for why. With `non_loss_data=True`
    (forward-only schedule with collect_non_loss_data) returns this micro-batch's token logprobs [T]
    instead, e.g. to fill `old_logprobs` / `ref_logprobs` before the update.
    """
    logits = mb.packed_logits(output_tensor)
    if non_loss_data:
        return token_logprobs(logits, mb.target_ids, cfg.temperature, tp_group, backend=backend).detach()
    loss, metrics = grpo_loss(
        logits, mb.target_ids, mb.old_logprobs, mb.advantages, mb.loss_mask, mb.cu_seqlens, cfg,
        ref_logprobs=mb.ref_logprobs, gen_logprobs=mb.gen_logprobs, tp_group=tp_group, backend=backend,
        global_num_tokens=max(totals.num_tokens, 1), global_num_seqs=max(totals.num_seqs, 1),
    )
    n_mb = int((mb.loss_mask != 0).sum())
    n = torch.tensor(n_mb, dtype=torch.int, device=loss.device)
    scaled = loss * totals.num_tokens
    reported = {"loss": torch.stack([scaled.detach().float(), n.float()])}
    for name in MEAN_METRICS:
        if name in metrics:
            reported[name] = torch.stack([metrics[name].to(loss.device) * n_mb, n.float()])
    return scaled, n, reported


def _check_config(config) -> None:
    if not getattr(config, "calculate_per_token_loss", False):
        raise ValueError(
            "sglgym's megatron forward_step needs TransformerConfig.calculate_per_token_loss=True (and a DDP "
            "model with config.finalize_model_grads_func set): otherwise megatron divides each micro-batch "
            "loss by its token count and the number of micro-batches, which is not the GRPO loss")
    if torch.is_grad_enabled() and getattr(config, "finalize_model_grads_func", None) is None:
        raise ValueError(
            "config.finalize_model_grads_func is None: nothing would divide the gradients by the step's token "
            "count (set it to megatron.core.distributed.finalize_model_grads; run evaluation under torch.no_grad())")
    if getattr(config, "context_parallel_size", 1) > 1:
        raise NotImplementedError("context parallelism splits sequences; the GRPO loss needs whole ones")


def _default_tp_group(config):
    if getattr(config, "tensor_model_parallel_size", 1) <= 1:
        return None
    from megatron.core import parallel_state
    return parallel_state.get_tensor_model_parallel_group()


def _forward(data_iterator: Iterator[MicroBatch], model: torch.nn.Module, tp_group):
    """The next micro-batch through the model: (logits [B, L, V(/tp)], the micro-batch, the TP group)."""
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    _check_config(config)
    group = tp_group if tp_group is not None else _default_tp_group(config)
    device = next(model.parameters()).device
    mb = next(data_iterator).to(device)
    b, length = mb.input_ids.shape
    position_ids = torch.arange(length, device=device).unsqueeze(0).expand(b, length)
    # Right padding + the causal mask: real tokens never attend to padding, so no explicit mask.
    return model(mb.input_ids, position_ids, None), mb, group


def make_forward_step(cfg: GRPOLossConfig, totals: StepTotals, *, tp_group=None,
                      backend: str = "auto") -> Callable[[Iterator[MicroBatch], torch.nn.Module], tuple]:
    """forward_step(data_iterator, model) -> (logits, partial(loss_func, ...)) for megatron's schedules.

    `tp_group`: the tensor-parallel group (default: megatron's, when the model is tensor-parallel).
    """
    step_cfg = step_loss_config(cfg, totals)

    def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
        logits, mb, group = _forward(data_iterator, model, tp_group)
        return logits, partial(loss_func, mb, step_cfg, totals, group, backend)

    return forward_step


def sft_loss_func(mb: MicroBatch, tp_group, backend: str, output_tensor: Tensor):
    """Supervised loss of one micro-batch as (sum of -logp over its loss tokens, n_mb, metrics): with
    calculate_per_token_loss megatron divides the gradients by the step's token count (the warm-up)."""
    logp = token_logprobs(mb.packed_logits(output_tensor), mb.target_ids, 1.0, tp_group, backend=backend)
    nll = -(logp * mb.loss_mask).sum()
    n = (mb.loss_mask != 0).sum().to(torch.int)
    return nll, n, {"loss": torch.stack([nll.detach().float(), n.float()])}


def make_sft_forward_step(*, tp_group=None, backend: str = "auto"):
    """forward_step for the supervised warm-up (same conventions as `make_forward_step`)."""

    def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
        logits, mb, group = _forward(data_iterator, model, tp_group)
        return logits, partial(sft_loss_func, mb, group, backend)

    return forward_step
