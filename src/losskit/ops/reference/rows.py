"""Pure-torch row kernel: softmax cross-entropy (and its focal and z-loss variants) on one block.

Reference expression (per row ``i`` of ``x``, index target ``y``, class weights ``w``, smoothing ``ls``)::

    logp = x.log_softmax(-1)
    loss_i = (1 - ls) * w[y] * -logp[y] + ls / C * sum_c w[c] * -logp[c]        # cross_entropy
    loss_i = w[y] * -(1 - exp(logp[y]))**gamma * logp[y]                        # focal (ls = 0)
    loss_i += z_loss * logsumexp(x)**2

and for probability targets ``t`` (smoothed ``t' = (1 - ls) t + ls / C``)
``loss_i = sum_c w[c] t'[c] * -logp[c]``. The block is transformed in place into
``scale * d(loss_i)/dx``; the gradient of each variant has the shape

    grad[c] = scale * (alpha_i * p[c] - beta_i * [c == y_i] - gamma_i * w[c])        (index targets)
    grad[c] = scale * (alpha_i * p[c] - w[c] t'[c])                                 (probability targets)

so the work is: one max, one subtract, one exp, one sum, one multiply, and a scatter, all while the
block is in cache. Shapes: ``work`` (rows, C) in the accumulation dtype, contiguous; per-row vectors (rows,).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..blocks import block_rows, blocks, work_buffer


@dataclass
class RowSpec:
    """Options shared by every block of one call."""

    weight: Tensor | None = None  # (C,) accumulation dtype
    ignore_index: int = -100
    label_smoothing: float = 0.0
    gamma: float = 0.0  # focal exponent; 0 is plain cross-entropy
    z_loss: float = 0.0
    argmax: bool = False  # also return each row's argmax (read from the max pass, no extra pass)


@dataclass
class RowResult:
    loss: Tensor  # (rows,) per-row loss, weights applied, not reduced; 0 for ignored rows
    lse: Tensor  # (rows,) log-sum-exp of the row
    argmax: Tensor | None = None  # (rows,) int64 index of the first maximal logit, if spec.argmax


def xent_rows_(work: Tensor, target: Tensor, spec: RowSpec, scale: Tensor | float, want_grad: bool,
               target_grad: Tensor | None = None) -> RowResult:
    """Cross-entropy of each row of ``work``; if ``want_grad``, ``work`` becomes ``scale * dloss/dx``.

    ``target``: (rows,) int64 class indices, or (rows, C) probabilities in the work dtype.
    ``scale``: the reduction's factor, a float or a 0-dim/(rows,) tensor.
    ``target_grad``: optional (rows, C) buffer that receives ``scale * dloss/dtarget`` (probability targets).
    """
    n_classes = work.shape[1]
    w, ls = spec.weight, spec.label_smoothing
    # m: (rows, 1); a row of all -inf gives NaN, as torch's log_softmax. top: (rows,) first argmax.
    m, top = work.max(1, keepdim=True) if spec.argmax else (work.amax(1, keepdim=True), None)
    top = None if top is None else top.squeeze(1)
    work.sub_(m)  # work = x - max <= 0
    if target.dim() == 2:
        res = _prob_rows_(work, m.squeeze(1), target, spec, scale, want_grad, target_grad)
        res.argmax = top
        return res

    ignored = target == spec.ignore_index
    safe = target.masked_fill(ignored, 0).unsqueeze(1)  # (rows, 1) a valid index for every row
    x_y = work.gather(1, safe).squeeze(1)  # x[y] - max
    keep = (~ignored).to(work.dtype)  # (rows,) 1 for scored rows, 0 for ignored ones
    w_y = (w[safe.squeeze(1)] if w is not None else torch.ones_like(x_y)) * keep
    if ls:
        wx = work @ w if w is not None else work.sum(1)  # sum_c w_c (x_c - max)
        w_total = w.sum() if w is not None else n_classes
    work.exp_()
    sumexp = work.sum(1)
    log_s = sumexp.log()  # logsumexp(x) - max
    lse = m.squeeze(1) + log_s
    logp_y = (x_y - log_s).masked_fill(ignored, 0.0)  # ignored rows: finite even if x[0] is -inf or NaN

    if spec.gamma:
        q = -torch.expm1(logp_y)  # 1 - p_y, accurate when p_y is near 1
        q_g = q.pow(spec.gamma)
        loss = -w_y * q_g * logp_y
    else:
        loss = -(1 - ls) * w_y * logp_y
    if ls:
        smooth = (w_total * log_s - wx).masked_fill(ignored, 0)  # sum_c w_c * -logp_c
        loss = loss + (ls / n_classes) * smooth
    if spec.z_loss:
        loss = loss + spec.z_loss * (lse * lse).masked_fill(ignored, 0)

    if want_grad:
        if spec.gamma:
            # d/dx_c of -q^g log p_y = a * (p_c - [c == y]) with a = q^g - g p_y q^(g-1) log p_y;
            # q^(g-1) log p_y is written q^g * (log p_y / q), whose limit at q = 0 is q^g * -1.
            ratio = torch.where(q > 0, logp_y / q, torch.full_like(q, -1.0))
            beta = w_y * q_g * (1 - spec.gamma * logp_y.exp() * ratio)
        else:
            beta = (1 - ls) * w_y
        alpha = beta + (ls / n_classes) * w_total * keep if ls else beta  # the smoothing term's share of p
        if spec.z_loss:
            alpha = alpha + (2 * spec.z_loss) * lse.masked_fill(ignored, 0)
        alpha, beta = alpha * scale, beta * scale
        work.mul_((alpha / sumexp).unsqueeze(1))  # alpha * p
        work.scatter_add_(1, safe, -beta.unsqueeze(1))
        if ls:
            g = (ls / n_classes) * keep * scale  # (rows,)
            work.sub_(torch.outer(g, w) if w is not None else g.unsqueeze(1))
    return RowResult(loss, lse, top)


def _prob_rows_(work: Tensor, m: Tensor, target: Tensor, spec: RowSpec, scale: Tensor | float,
                want_grad: bool, target_grad: Tensor | None) -> RowResult:
    """Probability targets; ``work`` already holds ``x - max`` and ``m`` the row max (rows,)."""
    n_classes = work.shape[1]
    ls, w = spec.label_smoothing, spec.weight
    t = target * (1 - ls) + ls / n_classes if ls else target
    wt = t * w if w is not None else t  # (rows, C) w_c t'_c
    wt_sum = wt.sum(1)
    wt_x = (wt * work).sum(1)  # sum_c w_c t'_c (x_c - max)
    if target_grad is not None:
        # d/dt_c = (1 - ls) * w_c * -logp_c needs log_s before work is overwritten by exp.
        log_s = torch.logsumexp(work, 1)
        torch.sub(log_s.unsqueeze(1), work, out=target_grad)
        if w is not None:
            target_grad.mul_(w)
        target_grad.mul_((1 - ls) * (scale.unsqueeze(1) if isinstance(scale, Tensor) and scale.dim() else scale))
    work.exp_()
    sumexp = work.sum(1)
    log_s = sumexp.log()
    loss = wt_sum * log_s - wt_x
    if spec.z_loss:
        loss = loss + spec.z_loss * (m + log_s) ** 2
    if want_grad:
        alpha = wt_sum + (2 * spec.z_loss * (m + log_s) if spec.z_loss else 0)
        s = scale.unsqueeze(1) if isinstance(scale, Tensor) and scale.dim() else scale
        work.mul_((alpha / sumexp).unsqueeze(1)).sub_(wt).mul_(s)
    return RowResult(loss, m + log_s)


def xent_rows(x3: Tensor, target: Tensor, grad3: Tensor | None, target_grad3: Tensor | None, weight: Tensor | None,
              loss: Tensor, *, ignore_index: int, label_smoothing: float, gamma: float, scale: Tensor | float) -> None:
    """The reference backend of the ``xent_rows`` operation: the C kernel's arguments
    (:func:`losskit.ops.cpu.native.xent_rows`), computed by :func:`xent_rows_` over cache-sized blocks.

    ``x3`` (N, C, L) any strides; ``target`` (N*L,) int64 or (N, C, L) probabilities; ``grad3`` and
    ``target_grad3`` (N, C, L) outputs or None; ``loss`` (N, L) in the accumulation dtype.
    """
    n, n_classes, length = x3.shape
    acc, want_x = loss.dtype, grad3 is not None
    probabilities = target.is_floating_point()
    spec = RowSpec(weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing, gamma=gamma)
    tgt = target if probabilities else target.view(n, length)
    loss2 = loss.view(n, length)
    # work: (rows, C) acc dtype, BLOCK_BYTES; with a float32/64 (N, C) input the gradient rows are
    # used as the work buffer directly and no copy-back is needed.
    rows = block_rows(n_classes, torch.finfo(acc).bits // 8)
    in_place = want_x and x3.dtype == acc and length == 1 and grad3.is_contiguous()
    buf = None if in_place else work_buffer(min(rows, n * length), n_classes, acc, x3.device)
    tbuf = work_buffer(min(rows, n * length), n_classes, acc, x3.device) if target_grad3 is not None else None
    for blk in blocks(n, length, rows):
        nb, nl = blk.b1 - blk.b0, blk.l1 - blk.l0
        work = grad3[blk.b0:blk.b1, :, 0] if in_place else buf[:blk.rows]
        work.view(nb, nl, n_classes).copy_(blk.of(x3))
        tb = blk.of(tgt).reshape(-1, n_classes).to(acc) if probabilities else blk.positions(tgt)
        tgb = tbuf[:blk.rows] if tbuf is not None else None
        res = xent_rows_(work, tb, spec, scale, want_x, tgb)
        loss2[blk.b0:blk.b1, blk.l0:blk.l1] = res.loss.view(nb, nl)
        if want_x and not in_place:
            blk.of(grad3).copy_(work.view(nb, nl, n_classes))
        if tgb is not None:
            blk.of(target_grad3).copy_(tgb.view(nb, nl, n_classes))


def nll_rows(x3: Tensor, target: Tensor, grad3: Tensor | None, weight: Tensor | None, loss: Tensor, *,
             ignore_index: int, scale: Tensor | float) -> None:
    """The reference backend of ``nll_rows`` (the arguments of :func:`losskit.ops.cpu.native_softmax.nll_rows`):
    ``loss = -w[y] * x[n, y, l]`` (0 where ignored, even when that entry is -inf) by one gather, and the
    gradient by ``zero_`` + ``scatter_``."""
    n, _, length = x3.shape
    acc = loss.dtype
    t2 = target.view(n, length)
    valid = (t2 != ignore_index).unsqueeze(1)  # (N, 1, L)
    safe = t2.masked_fill(~valid.squeeze(1), 0).unsqueeze(1)  # (N, 1, L) a valid index everywhere
    w_y = (weight[safe] if weight is not None else torch.ones(safe.shape, dtype=acc, device=x3.device)) * valid
    loss.view(n, length).copy_((-(x3.gather(1, safe).to(acc) * w_y)).masked_fill(~valid, 0.0).squeeze(1))
    if grad3 is not None:
        grad3.zero_().scatter_(1, safe, (-w_y * scale).to(grad3.dtype))
