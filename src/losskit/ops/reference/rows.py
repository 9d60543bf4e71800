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
            alpha = beta
        else:
            beta = (1 - ls) * w_y
            alpha = beta + (ls / n_classes) * w_total * keep if ls else beta
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
