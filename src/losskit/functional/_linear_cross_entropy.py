"""``linear_cross_entropy``: a linear layer (a language-model head) and softmax cross-entropy, fused.

The ``(N, C)`` logits are never materialised: :mod:`losskit.ops.linear_xent` computes them a chunk
of samples at a time and turns each chunk into the gradients for input, weight and bias before the next
one, so memory above the inputs is the gradients plus one chunk, whatever N is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _autocast, _checks, _reduction
from .._autograd import attach, needs_grad
from .._types import IMPLS, Impl, Reduction
from ..ops.blocks import accumulation_dtype
from ..ops.linear_xent import (Problem, Sweep, chunk_budget, chunk_rows, class_buffers, products_dtype, rounded,
                               row_kernel, sweep)
from ..ops.reference.rows import RowSpec

__all__ = ["LinearCrossEntropyResult", "linear_cross_entropy", "linear_cross_entropy_with_stats"]


class LinearCrossEntropyResult(NamedTuple):
    """What :func:`linear_cross_entropy_with_stats` returns; every field is always present.

    ``loss``: as :func:`linear_cross_entropy` (differentiable). ``lse``: the log-sum-exp of each
    position's (soft-capped) logits, the loss's positions' shape, float32 (float64 for float64 input),
    detached. ``argmax``: the predicted class of each position (first maximal logit), int64, same shape.
    ``accuracy``: 0-dim float32 (float64 for float64 input), the fraction of scored positions whose
    argmax is the target class (for probability targets, the target's most probable class); positions
    whose target is ``ignore_index`` are not scored; NaN when none is.
    """

    loss: Tensor
    lse: Tensor
    argmax: Tensor
    accuracy: Tensor


@dataclass(frozen=True)
class _Options:
    """Everything but the tensors: enough to rebuild the :class:`Problem` in a recomputing backward."""

    spec: RowSpec
    softcap: float | None
    rows: int
    probabilities: bool
    reduction: str
    impl: str


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Tensor | None = None,
                         weight: Tensor | None = None, reduction: Reduction = "mean", ignore_index: int | None = None,
                         label_smoothing: float = 0.0, options: object = None, z_loss: float = 0.0,
                         softcap: float | None = None, chunk_size: int | None = None, impl: Impl = "auto") -> Tensor:
    r"""Cross-entropy of the logits ``input @ linear_weight.T + linear_bias``, without materialising them.

    Drop-in for ``torch.nn.functional.linear_cross_entropy`` (torch 2.13). Reference expression::

        logits = F.linear(input, linear_weight.flatten(0, -2), linear_bias.flatten()).view(N, C, d1, ..., dk)
        logits = softcap * torch.tanh(logits / softcap)             # only if softcap is given
        loss = F.cross_entropy(logits, target, weight, ignore_index=..., label_smoothing=...)
        loss = loss + z_loss * logsumexp(logits, 1)**2              # per position, before the reduction

    ``input``: ``(D,)`` or ``(N, D)``. ``linear_weight``: ``(C, D)``, or ``(C, d1, ..., dk, D)`` for a
    K-dimensional loss (each sample gets ``d1*...*dk`` positions, each a softmax over ``C`` classes;
    needs batched input). ``linear_bias``: ``(C, d1, ..., dk)`` or None. ``target``: class indices
    (integer dtype, shape ``()``, ``(N,)`` or ``(N, d1, ..., dk)``) or class probabilities (floating,
    the logits' shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``). ``weight``: ``(C,)`` class weights.

    With ``z`` a position's logits, ``p = log_softmax(z)``, smoothing ``s`` and class weights ``w``
    (ones when None), the unreduced loss of a position with class target ``y`` is

    .. math:: \ell = (1 - s)\, w_y (-p_y) + \frac{s}{C} \sum_c w_c (-p_c)
              + \text{z\_loss} \cdot \operatorname{logsumexp}(z)^2, \qquad 0 \text{ if } y = \text{ignore\_index},

    and with probability targets ``t`` (smoothed to ``(1 - s) t + s / C``)
    :math:`\ell = \sum_c w_c t_c (-p_c) + \text{z\_loss} \cdot \operatorname{logsumexp}(z)^2`.
    ``reduction="mean"`` divides the sum by :math:`\sum w_y` over non-ignored positions for class
    targets (NaN when every target is ignored) and by the number of positions for probability targets;
    ``"sum"`` sums; ``"none"`` returns the positions' shape ``()``, ``(N,)`` or ``(N, d1, ..., dk)``.
    The output has the input's dtype; accumulation is float32 (float64 for float64 input), weight
    gradients included.

    The three matrix products run in the input's dtype where the hardware multiplies it natively:
    bfloat16 and float16 on CUDA, bfloat16 on CPUs with AMX or AVX512-BF16 (decided by capability,
    ``torch.cpu.get_capabilities()``'s ``amx_bf16``/``avx512_bf16``, the /proc/cpuinfo flags; measured
    2.5x faster than float32 products on an AVX512-BF16 CPU). There the logits are bfloat16 as in
    ``F.cross_entropy((input @ linear_weight.T).float(), target)``, the cross-entropy step reads them and
    computes in float32, and the weight gradient is a float32 sum of the chunks' products, rounded to
    the weight's dtype once. CPUs that emulate 16-bit products (AVX2) upcast the operands to float32.

    ``ignore_index`` defaults to None, read as -100 for class targets (torch's convention); it cannot be
    given with probability targets. ``options`` (a ``torch.nn.LinearCrossEntropyOptions``) is accepted so
    that code written for torch runs: its ``batch_chunk_size`` sets the chunk size like ``chunk_size``
    and ``allow_retain_graph=True`` makes backward recompute the gradients (so it may run twice); its
    precision fields are ignored (accumulation is always at least float32).

    Keyword-only extras: ``z_loss`` (coefficient of ``logsumexp^2``), ``softcap`` (``c * tanh(z / c)``
    applied to the logits before the softmax), ``chunk_size`` (samples per chunk, overriding the choice
    from the memory budget in :func:`losskit.ops.linear_xent.chunk_rows`), ``impl`` (who runs each chunk's
    cross-entropy step: see :func:`losskit.functional.cross_entropy`; the products are torch's matmuls
    whatever it is).

    Gradients for whichever of ``input``, ``linear_weight``, ``linear_bias`` (and probability
    ``target``) require grad are computed chunk by chunk in the forward pass for "mean" and "sum". For
    "none" the gradient depends on ``grad_output``, so the forward computes the loss only and backward
    recomputes the logits chunk by chunk (one more matrix product), still without materialising them.

    Example:
        >>> import torch, losskit.functional as LF
        >>> x = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
        >>> head = torch.tensor([[0.5, 0.1], [-0.3, 0.8], [1.0, 0.0]])
        >>> LF.linear_cross_entropy(x, head, torch.tensor([2, 1]))
        tensor(0.5379)
    """
    return _fused(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing,
                  options, z_loss, softcap, chunk_size, impl, stats=False)[0]


def linear_cross_entropy_with_stats(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                                    linear_bias: Tensor | None = None, weight: Tensor | None = None,
                                    reduction: Reduction = "mean", ignore_index: int | None = None,
                                    label_smoothing: float = 0.0, options: object = None, z_loss: float = 0.0,
                                    softcap: float | None = None, chunk_size: int | None = None,
                                    impl: Impl = "auto") -> LinearCrossEntropyResult:
    """:func:`linear_cross_entropy` plus per-position log-sum-exp, argmax and token accuracy, from the
    same pass over the logits (see :class:`LinearCrossEntropyResult`). Arguments as
    :func:`linear_cross_entropy`.

    Example:
        >>> import torch, losskit.functional as LF
        >>> x = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
        >>> head = torch.tensor([[0.5, 0.1], [-0.3, 0.8], [1.0, 0.0]])
        >>> out = LF.linear_cross_entropy_with_stats(x, head, torch.tensor([2, 2]))
        >>> out.argmax, out.accuracy
        (tensor([2, 1]), tensor(0.5000))
    """
    loss, s, target2 = _fused(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                              label_smoothing, options, z_loss, softcap, chunk_size, impl, stats=True)
    shape = _positions_shape(input, linear_weight)
    if target2.is_floating_point():
        scored = torch.ones_like(s.argmax, dtype=torch.bool)
        correct = s.argmax == target2.argmax(1)
    else:
        scored = target2 != (-100 if ignore_index is None else ignore_index)
        correct = (s.argmax == target2) & scored
    accuracy = correct.sum().to(s.lse.dtype) / scored.sum()
    return LinearCrossEntropyResult(loss, s.lse.view(shape), s.argmax.view(shape), accuracy)


def _fused(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None, weight: Tensor | None,
           reduction: str, ignore_index: int | None, label_smoothing: float, options: object, z_loss: float,
           softcap: float | None, chunk_size: int | None, impl: object, *, stats: bool
           ) -> tuple[Tensor, Sweep, Tensor]:
    """Validate, run the sweep, wire the gradients; returns the loss, the sweep and the (N, L) or
    (N, C, L) target the sweep read."""
    opts, lazy = _validate(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                           label_smoothing, options, z_loss, softcap, chunk_size, impl, stats)
    p = _problem(input, linear_weight, linear_bias, target, opts)
    tensors = (input, linear_weight, linear_bias, target)
    wants = needs_grad(input, linear_weight, linear_bias, target if opts.probabilities else None)
    precompute = any(wants) and not lazy
    with torch.no_grad():
        denominator = _denominator(p)
        scale = _reduction.scale(reduction, denominator, p.target.shape[0] * p.target.shape[-1])
        s = _sweep(p, scale, want_input=wants[0] and precompute, want_weight=wants[1] and precompute,
                   want_bias=wants[2] and precompute, want_target=wants[3] and precompute)
        loss = _reduction.reduce(s.loss.view(_positions_shape(input, linear_weight)), reduction, denominator)
        # Under autocast torch runs the linear layer in the low-precision dtype and cross_entropy in float32
        # (float64 stays float64); so does this. The inputs are not cast to float32 up front as
        # _autocast.float32_under_autocast would: that would upcast the products' operands, the head included.
        loss = loss.to(accumulation_dtype(input.dtype) if _autocast.enabled(input.device.type) else input.dtype)
    if lazy and any(wants):
        loss = _Recompute.apply(opts, scale, loss, *tensors)
    else:
        loss = attach(loss, tensors, _shaped_grads(s, *tensors))
    return loss, s, p.target


def _validate(input: object, linear_weight: object, target: object, linear_bias: object, weight: object,
              reduction: object, ignore_index: object, label_smoothing: object, options: object, z_loss: object,
              softcap: object, chunk_size: object, impl: object, stats: bool) -> tuple[_Options, bool]:
    """Every check, before any chunk runs; returns the options and whether backward recomputes."""
    x = _checks.floating("input", input)
    if x.dim() not in (1, 2):
        raise ValueError(
            f"input must have shape (in_features,) or (N, in_features), got {tuple(x.shape)}; flatten leading "
            f"dimensions first (input.flatten(0, -2), target.flatten()), as torch.nn.functional.linear does not"
        )
    w = _checks.floating("linear_weight", linear_weight)
    if w.dim() < 2:
        raise ValueError(f"linear_weight must have shape (C, in_features) or (C, d1, ..., dk, in_features), got "
                         f"{tuple(w.shape)}")
    _same_dtype("linear_weight", w, x)
    _checks.same_device("linear_weight", w, "input", x)
    if w.shape[-1] != x.shape[-1]:
        raise ValueError(f"linear_weight's last dimension (in_features) must equal input's: linear_weight has shape "
                         f"{tuple(w.shape)}, input has shape {tuple(x.shape)}")
    n_classes, out_features = w.shape[0], tuple(w.shape[1:-1])
    if n_classes == 0:
        raise ValueError(f"linear_weight must have at least one class (dim 0), got shape {tuple(w.shape)}")
    if out_features and x.dim() == 1:
        raise ValueError(f"a K-dimensional loss (linear_weight of shape {tuple(w.shape)}) needs batched input "
                         f"(N, {x.shape[-1]}), got {tuple(x.shape)}")
    if linear_bias is not None:
        b = _checks.floating("linear_bias", linear_bias)
        _same_dtype("linear_bias", b, x)
        _checks.same_device("linear_bias", b, "input", x)
        if tuple(b.shape) != (n_classes, *out_features):
            raise ValueError(f"linear_bias must have shape {(n_classes, *out_features)} for linear_weight of shape "
                             f"{tuple(w.shape)}, got {tuple(b.shape)}")
    probabilities = _check_target(target, x, n_classes, out_features)
    _checks.reduction(reduction)
    if ignore_index is not None:
        _checks.integer("ignore_index", ignore_index)
        if probabilities:
            raise ValueError(f"ignore_index cannot be given with probability targets (target has the logits' shape "
                             f"{tuple(_checks.tensor('target', target).shape)}), got ignore_index={ignore_index!r}")
    ignore = -100 if ignore_index is None else ignore_index
    if not probabilities:
        _checks.class_targets(target, n_classes, ignore)
    class_weight = _checks.class_weight(weight, n_classes, x)
    ls = _checks.number_in("label_smoothing", label_smoothing, 0.0, 1.0)
    zl = _checks.number_in("z_loss", z_loss, 0.0)
    cap = None if softcap is None else _checks.number_in("softcap", softcap, 0.0)
    if cap == 0.0:
        raise ValueError("softcap must be > 0 (or None for no soft-capping), got 0")
    torch_chunk, retain = _torch_options(options)
    acc = accumulation_dtype(x.dtype)
    spec = RowSpec(weight=None if class_weight is None else class_weight.to(acc), ignore_index=ignore,
                   label_smoothing=ls, z_loss=zl, argmax=stats)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    rows = _chunk_size(chunk_size, torch_chunk)
    if rows is None:
        rows = chunk_rows(x.shape[0] if x.dim() == 2 else 1, n_classes, x.shape[-1], x.dtype,
                          class_buffers(spec, cap, probabilities), chunk_budget(x.device),
                          products=products_dtype(x.dtype, x.device),
                          kernel=row_kernel(x, target, spec, cap, str(impl), per_position=reduction == "none")
                          is not None)
    return _Options(spec, cap, rows, probabilities, str(reduction), str(impl)), reduction == "none" or retain


def _same_dtype(name: str, value: Tensor, x: Tensor) -> None:
    """Operands of the linear layer share a dtype, as for F.linear; under autocast, where torch casts them
    to a common dtype, any floating dtypes are accepted (the products run in the input's dtype or float32,
    the head cast to it)."""
    if value.dtype != x.dtype and not _autocast.enabled(x.device.type):
        raise TypeError(f"{name} has dtype {value.dtype} but input has {x.dtype}; they must match, as for F.linear")


def _check_target(target: object, x: Tensor, n_classes: int, out_features: tuple[int, ...]) -> bool:
    """True for probability targets (the logits' shape, floating); else class indices are required."""
    t = _checks.tensor("target", target)
    _checks.same_device("target", t, "input", x)
    logits_shape = (*x.shape[:-1], n_classes, *out_features)
    if tuple(t.shape) == logits_shape:
        if not t.is_floating_point():
            raise TypeError(f"target has the logits' shape {logits_shape}, so it is read as class probabilities and "
                            f"must be floating point, got {t.dtype}")
        return True
    index_shape = (*x.shape[:-1], *out_features)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"target must hold class indices with an integer dtype, shape {index_shape}, or "
                        f"probabilities of the logits' shape {logits_shape}; got {t.dtype} of shape {tuple(t.shape)}")
    if tuple(t.shape) != index_shape:
        raise ValueError(f"target must have shape {index_shape} (or {logits_shape} for probabilities) for input of "
                         f"shape {tuple(x.shape)} and {n_classes} classes, got {tuple(t.shape)}")
    return False


def _torch_options(options: object) -> tuple[int | None, bool]:
    """``(batch_chunk_size, allow_retain_graph)`` of a ``torch.nn.LinearCrossEntropyOptions``."""
    if options is None:
        return None, False
    cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if cls is None or not isinstance(options, cls):
        raise TypeError(f"options must be None or a torch.nn.LinearCrossEntropyOptions, got {type(options).__name__}")
    return options.batch_chunk_size, bool(options.allow_retain_graph)


def _chunk_size(chunk_size: object, torch_chunk: int | None) -> int | None:
    if chunk_size is None:
        return torch_chunk
    rows = _checks.integer("chunk_size", chunk_size)
    if rows < 1:
        raise ValueError(f"chunk_size must be a positive number of samples, got {rows}")
    if torch_chunk is not None and torch_chunk != rows:
        raise ValueError(f"chunk_size={rows} and options.batch_chunk_size={torch_chunk} disagree; pass only one")
    return rows


def _positions_shape(input: Tensor, linear_weight: Tensor) -> tuple[int, ...]:
    """The unreduced loss's shape: ``()``, ``(N,)`` or ``(N, d1, ..., dk)``."""
    return (*input.shape[:-1], *linear_weight.shape[1:-1])


def _problem(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor,
             opts: _Options) -> Problem:
    """Views in the sweep's shapes: x (N, D), W (C, L, D), b (C, L), target (N, L) or (N, C, L)."""
    n_classes, d = linear_weight.shape[0], linear_weight.shape[-1]
    length = math.prod(linear_weight.shape[1:-1])
    x = input.reshape(-1, d)
    n = x.shape[0]
    t = target.reshape(n, n_classes, length) if opts.probabilities else target.reshape(n, length).long()
    return Problem(x, linear_weight.reshape(n_classes, length, d),
                   None if linear_bias is None else linear_bias.reshape(n_classes, length), t, opts.spec,
                   opts.softcap, opts.rows, opts.impl)


def _denominator(p: Problem) -> Tensor | float:
    """"mean"'s divisor: the number of positions for probability targets, else the summed class weight
    (count when unweighted) of the non-ignored targets, as torch's cross_entropy."""
    if p.probabilities:
        return float(p.target.shape[0] * p.target.shape[2])
    valid = p.target != p.spec.ignore_index
    if p.spec.weight is None:
        return valid.sum().to(accumulation_dtype(p.x.dtype))
    return (p.spec.weight[p.target.masked_fill(~valid, 0)] * valid).sum()


def _sweep(p: Problem, scale: Tensor | float, **wants: bool) -> Sweep:
    """:func:`sweep` with autocast off: it picks each product's dtype itself (autocast would recast the
    functional products of its torch row step to bfloat16, those with ``out=`` it leaves alone)."""
    device_type = p.x.device.type
    if not _autocast.enabled(device_type):
        return sweep(p, scale, **wants)
    with torch.autocast(device_type, enabled=False):
        return sweep(p, scale, **wants)


def _shaped_grads(s: Sweep, input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None,
                  target: Tensor | None) -> tuple[Tensor | None, ...]:
    """The sweep's gradients in each tensor's own shape and dtype (accumulators cast down at the end)."""
    def like(g: Tensor | None, ref: Tensor | None) -> Tensor | None:
        return None if g is None or ref is None else rounded(g.view(ref.shape), ref.dtype)
    return like(s.grad_input, input), like(s.grad_weight, linear_weight), like(s.grad_bias, linear_bias), \
        like(s.grad_target, target)


class _Recompute(torch.autograd.Function):
    """Backward recomputes the chunks with ``grad_output`` folded into the scale: for "none" (whose
    weight gradient is a grad_output-weighted sum no precomputed tensor can give) and for
    ``allow_retain_graph`` (backward may run twice). Saving the inputs also makes autograd refuse a
    backward after any of them was modified in place."""

    @staticmethod
    def forward(ctx, opts, scale, loss, input, linear_weight, linear_bias, target):  # type: ignore[override]
        ctx.opts, ctx.scale = opts, scale
        ctx.save_for_backward(input, linear_weight, linear_bias, target)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        input, linear_weight, linear_bias, target = ctx.saved_tensors
        opts: _Options = ctx.opts
        p = _problem(input, linear_weight, linear_bias, target, opts)
        acc = accumulation_dtype(input.dtype)
        if opts.reduction == "none":
            scale = grad_output.to(acc).reshape(p.target.shape[0], p.target.shape[-1])  # (N, L)
        else:
            scale = grad_output.to(acc) * ctx.scale
        want = ctx.needs_input_grad[3:]
        with torch.no_grad():
            s = _sweep(p, scale, want_input=want[0], want_weight=want[1], want_bias=want[2], want_target=want[3])
        return (None, None, None, *_shaped_grads(s, input, linear_weight, linear_bias,
                                                  target if opts.probabilities else None))
