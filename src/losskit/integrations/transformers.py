"""Hugging Face transformers: train causal language models without materialising the logits.

``patch(model)`` replaces the ``forward`` of one model instance. Called with ``labels``, the patched
forward runs the base model, then computes the loss with
:func:`losskit.functional.linear_cross_entropy` (its ``_with_stats`` form) straight from the last hidden
states and the ``lm_head`` weight, so no ``(tokens, vocabulary)`` tensor is ever allocated, in the
forward pass or the backward. The result is the same as transformers' own ``ForCausalLMLoss``:

* labels are shifted inside (position ``t`` predicts ``labels[t + 1]``; the last position predicts
  nothing), unless ``shift_labels`` is passed, which is used as given;
* positions labelled ``ignore_index`` (default -100) are skipped;
* with ``num_items_in_batch`` (what ``Trainer`` passes under gradient accumulation) the loss is the sum
  over the micro-batch divided by ``num_items_in_batch``; without it, the mean over non-ignored positions.

Reference expression (what the patched forward returns as ``loss``)::

    logits = lm_head(base_model(...).last_hidden_state)
    logits = c * tanh(logits / c)             # Gemma 2, c = config.final_logit_softcapping, if set
    ForCausalLMLoss(logits, labels, vocab_size, **loss_kwargs)

With ``labels`` the output is a ``CausalLMOutputWithPast`` whose ``logits`` is **None** (computing them
is the cost the patch removes; call without labels to get them). Without ``labels`` (inference,
``generate``), or with a non-zero ``logits_to_keep``, the original forward runs unchanged.
The loss is float32, as transformers returns it, also for a bfloat16/float16 model: its value comes from
the kernel's float32 log-sum-exp (not from the fused loss rounded to the model's dtype) and its
gradient is the fused kernel's.

Supported architectures (``SUPPORTED_MODEL_TYPES``) are those whose causal-LM head is a plain
``nn.Linear`` on the last hidden state, at most soft-capped, and that the tests check.

Example::

    from transformers import AutoModelForCausalLM
    from losskit.integrations.transformers import patch
    model = patch(AutoModelForCausalLM.from_pretrained(...))
    loss = model(input_ids=ids, labels=ids).loss   # no logits allocated
"""

from __future__ import annotations

import functools
import inspect
from typing import TypeVar

import torch
from torch import nn

try:
    from transformers import PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as error:  # the tests import this module with transformers hidden
    raise ImportError(
        "losskit.integrations.transformers needs Hugging Face transformers; install it with "
        "pip install 'losskit[hf]'"
    ) from error

from .. import _checks
from .. import functional as LF

__all__ = ["SUPPORTED_MODEL_TYPES", "is_patched", "patch", "unpatch"]

#: ``config.model_type`` values whose ``*ForCausalLM.forward`` is "base model, lm_head, ForCausalLMLoss"
#: with nothing between but Gemma 2's optional soft-cap of the logits (``final_logit_softcapping``, which
#: ``linear_cross_entropy`` applies as ``softcap``). Not listed: models that scale their logits (Cohere,
#: Granite) or were not tested.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "gemma", "gemma2"})

#: Arguments of ``ForCausalLMLoss`` that reach ``forward`` through ``**kwargs``; not passed to the base model.
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
_MARK = "_losskit_patched"

Model = TypeVar("Model", bound=nn.Module)


def patch(model: Model, *, chunk_size: int | None = None) -> Model:
    """Compute ``model``'s training loss with ``linear_cross_entropy``; returns ``model`` (patched in place).

    ``chunk_size``: tokens per chunk of logits (``linear_cross_entropy``'s ``chunk_size``); None lets
    losskit choose from its memory budget. Patching an already patched model only updates
    ``chunk_size``. Patch before handing the model to a wrapper that replaces ``forward`` itself
    (accelerate's device hooks, ``torch.compile``).
    """
    if chunk_size is not None and _checks.integer("chunk_size", chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model has config.model_type {model_type!r}; losskit's patch supports "
                         f"{sorted(SUPPORTED_MODEL_TYPES)}")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"model's output embeddings must be an nn.Linear (the lm_head), got {type(head).__name__}")
    if not is_patched(model):
        if "forward" in model.__dict__:
            raise ValueError(f"model.forward is already replaced on this {type(model).__name__} instance (by a "
                             f"device hook or another patch); call patch(model) before that wrapper")
        model.forward = _bind(model)
    setattr(model, _MARK, {"chunk_size": chunk_size})  # the options the patched forward reads
    return model


def unpatch(model: Model) -> Model:
    """Undo :func:`patch`: ``model`` computes its loss from full logits again. A no-op if not patched."""
    if is_patched(model):
        del model.forward
        delattr(model, _MARK)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` is in effect on ``model``."""
    return _MARK in model.__dict__


def _bind(model: nn.Module):
    """The patched forward bound to ``model``, with the class forward's name, docstring and signature.

    ``Trainer`` reads the signature (to keep dataset columns and to decide whether to pass
    ``num_items_in_batch``), so it must stay the original's. The function holds no reference to
    ``model``, so ``copy.deepcopy(model)`` rebinds it to the copy.
    """
    cls_forward = type(model).forward

    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        return _fused_forward(self, cls_forward, args, kwargs)

    return forward.__get__(model, type(model))


def _fused_forward(model: PreTrainedModel, cls_forward, args: tuple, kwargs: dict):
    bound = inspect.signature(cls_forward).bind(model, *args, **kwargs).arguments
    labels = bound.get("labels")
    keep = bound.get("logits_to_keep", 0)
    if labels is None or not (isinstance(keep, int) and keep == 0):
        return cls_forward(model, *args, **kwargs)

    named = {k: v for k, v in bound.items() if k not in ("self", "labels", "logits_to_keep")}
    var_kw = next(p.name for p in inspect.signature(cls_forward).parameters.values()
                  if p.kind is inspect.Parameter.VAR_KEYWORD)
    extra = dict(named.pop(var_kw, {}))
    loss_kwargs = {k: extra.pop(k) for k in _LOSS_KWARGS if k in extra}
    return_dict = extra.pop("return_dict", named.pop("return_dict", None))
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)

    outputs = model.base_model(**named, **extra, return_dict=True)
    loss = causal_lm_loss(outputs.last_hidden_state, model.get_output_embeddings(), labels,
                          softcap=getattr(model.config, "final_logit_softcapping", None),
                          chunk_size=getattr(model, _MARK)["chunk_size"], **loss_kwargs)
    result = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                    hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return result if return_dict else result.to_tuple()


def causal_lm_loss(hidden_states: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor, *,
                   num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
                   shift_labels: torch.Tensor | None = None, softcap: float | None = None,
                   chunk_size: int | None = None) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss(lm_head(hidden_states), labels, ...)`` without the logits.

    ``hidden_states``: (batch, seq, hidden); ``labels``/``shift_labels``: (batch, seq) class indices;
    ``softcap``: Gemma 2's ``final_logit_softcapping`` (``c * tanh(z / c)`` on the logits), or None;
    ``chunk_size``: as :func:`patch`.
    Returns a float32 scalar whose gradient is the fused kernel's.
    """
    if shift_labels is None:
        # Position t predicts labels[t + 1]; the last position is padded with ignore_index.
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # (tokens, hidden), a view
    target = shift_labels.reshape(-1).to(hidden.device)  # (tokens,)
    reduction = "mean" if num_items_in_batch is None else "sum"
    fused = LF.linear_cross_entropy_with_stats(hidden, lm_head.weight, target, linear_bias=lm_head.bias,
                                               ignore_index=ignore_index, reduction=reduction, softcap=softcap,
                                               chunk_size=chunk_size)
    # fused.loss has the model's dtype: for a bfloat16 model, one rounding of the reduced loss to 8 bits
    # of mantissa (0.03 at a loss of 6), where transformers reports float32. Take the value from the
    # kernel's float32 log-sum-exp instead and keep the kernel's gradient.
    loss = fused.loss.float()
    loss = loss + (_float32_loss(hidden, lm_head, target, fused.lse, ignore_index, reduction, softcap) - loss).detach()
    if num_items_in_batch is None:
        return loss
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _float32_loss(hidden: torch.Tensor, lm_head: nn.Linear, target: torch.Tensor, lse: torch.Tensor,
                  ignore_index: int, reduction: str, softcap: float | None) -> torch.Tensor:
    """``sum(lse - z_target)`` over scored tokens (divided by their count for "mean"), in float32.

    Only the target's logit is recomputed, from float32 copies of the hidden states and of the weight's
    target rows: temporaries of (tokens, hidden) float32 each (128 MiB at 8192 tokens x 4096), a vocabulary
    / hidden fraction of the float32 logits that transformers would hold (4 GiB at a 128k vocabulary).
    """
    with torch.no_grad():
        scored = target != ignore_index  # (tokens,)
        rows = target.masked_fill(~scored, 0)  # a valid row of the weight for every token
        z = (hidden.float() * lm_head.weight[rows].float()).sum(1)  # (tokens,) target logits
        if lm_head.bias is not None:
            z += lm_head.bias[rows].float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        total = torch.where(scored, lse.float() - z, 0.0).sum()
        return total if reduction == "sum" else total / scored.sum()
