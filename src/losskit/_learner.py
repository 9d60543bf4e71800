"""Check mode: warnings about the classic mistakes made when calling a loss.

Off by default. Switch it on with ``losskit.set_checks(True)`` or by starting Python with the environment
variable ``LOSSKIT_CHECKS=1``. When off, each check costs one Python call and one bool test; when on, it
reads a sample of the input (and so synchronises an accelerator) and may issue a :class:`LosskitWarning`
whose message says what to change. Checks are skipped while ``torch.compile`` traces, so a compiled
loss keeps its graph whatever the mode.

The heuristics, each cheap and aimed at the mistake rather than at every odd input:

* ``cross_entropy``/``focal_loss`` expect logits: rows that are already probabilities (every entry in
  [0, 1], every row summing to 1) mean softmax was applied before the loss;
* ``nll_loss`` expects log-probabilities: an entry above 0, or rows whose ``logsumexp`` is not 0;
* ``binary_cross_entropy_with_logits`` expects logits: at least 8 entries, all in [0, 1], look like
  probabilities (the chance of that for 8 logits drawn symmetric around 0 is below 1 in 250);
* ``kl_div`` expects log-probabilities as ``input`` (no entry above 0) and, unless ``log_target=True``,
  probabilities as ``target`` (no negative entry).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["LosskitWarning", "checks_enabled", "set_checks"]


class LosskitWarning(UserWarning):
    """A call that runs but is very likely not what was meant; the message says what to change."""


def _from_environment() -> bool:
    return os.environ.get("LOSSKIT_CHECKS", "").strip().lower() not in ("", "0", "false", "no", "off")


_enabled = _from_environment()

#: Rows (positions) of a class-dimension input that the row checks read: enough to see a systematic
#: mistake, few enough that a check allocates at most ``_SAMPLE_ROWS * C`` floats.
_SAMPLE_ROWS = 1024
#: Slack for "sums to 1" and "logsumexp is 0": a softmax rounded to bfloat16 sums to 1 within about
#: 2**-8 (each term rounded by at most 2**-9 of itself); 0.02 covers that, and a row of logits lands that
#: close to a distribution only by accident.
_SLACK = 0.02
#: Fewest elements from which a tensor all in [0, 1] is read as probabilities rather than small logits.
_MIN_BINARY = 8

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


def set_checks(enabled: bool) -> None:
    """Switch check mode on or off for the whole process (see :mod:`losskit._learner`)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} {enabled!r}")
    global _enabled
    _enabled = enabled


def checks_enabled() -> bool:
    """Whether check mode is on."""
    return _enabled


def _active() -> bool:
    return _enabled and not torch.compiler.is_compiling()


def _warn(message: str) -> None:
    """Warn at the first frame outside losskit and torch: the user's call, even through an nn.Module."""
    frame, level = sys._getframe(), 1  # level 1 is this frame
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, LosskitWarning, stacklevel=level)


def _rows(input: Tensor, class_dim: int) -> Tensor:
    """Up to ``_SAMPLE_ROWS`` positions of ``input`` as ``(rows, C)`` float32 rows."""
    n_classes = input.shape[class_dim]
    x = input.detach()
    if class_dim == 1:
        # (N, C, d1, ...) -> (N, C, L); keep ceil(S / L) samples and S positions of each (S = _SAMPLE_ROWS),
        # at most about 2 S positions, before the class dim moves last (a copy of only that much).
        x = x.flatten(2) if x.dim() > 2 else x.unsqueeze(2)
        x = x[:math.ceil(_SAMPLE_ROWS / x.shape[2]), :, :_SAMPLE_ROWS].movedim(1, 2)
    return x.reshape(-1, n_classes)[:_SAMPLE_ROWS].float()


def _eps(input: Tensor) -> float:
    return torch.finfo(input.dtype).eps


def _are_distributions(rows: Tensor) -> bool:
    """Every entry in [0, 1] and every row summing to 1 (within ``_SLACK``)."""
    lo, hi = torch.aminmax(rows)
    return bool(lo >= 0) and bool(hi <= 1) and bool(((rows.sum(1) - 1).abs() <= _SLACK).all())


def check_logits(loss: str, input: Tensor, class_dim: int) -> None:
    """``input`` of a softmax loss should be logits, not rows that are already probabilities."""
    if not _active() or input.numel() == 0 or input.shape[class_dim] < 2:
        return
    if _are_distributions(_rows(input, class_dim)):
        _warn(f"{loss} got input whose rows are already probabilities (entries in [0, 1], each row summing "
              f"to 1), but it expects raw logits and applies log_softmax itself, so softmax is applied twice "
              f"and the gradient nearly vanishes. Pass the logits from before softmax(...) instead; if you "
              f"only have probabilities, use nll_loss(probs.log(), target).")


def check_log_probabilities(loss: str, input: Tensor, class_dim: int) -> None:
    """``input`` of ``nll_loss`` should be log-probabilities: entries <= 0, each row's logsumexp 0."""
    if not _active() or input.numel() == 0:
        return
    rows = _rows(input, class_dim)
    if _are_distributions(rows) and input.shape[class_dim] > 1:
        _warn(f"{loss} got input whose rows are probabilities (entries in [0, 1], summing to 1), but it "
              f"expects log-probabilities. Pass log_softmax(logits, dim={class_dim}) instead of softmax(...), "
              f"or probs.log().")
    # Rounding each log-probability to the input dtype moves a row's logsumexp by up to about
    # entropy * eps <= log(C) * eps: 0.08 for bfloat16 at C = 50k, far below a row of logits' offset.
    elif bool((torch.logsumexp(rows, 1).abs() > _SLACK + math.log(rows.shape[1]) * _eps(input)).any()):
        _warn(f"{loss} got input that is not log-probabilities (exp of a row does not sum to 1): it looks "
              f"like raw logits. Apply log_softmax(input, dim={class_dim}) first, or call cross_entropy on "
              f"the logits, which does both in one step.")


def check_binary_logits(loss: str, input: Tensor) -> None:
    """``input`` of a with-logits binary loss should be logits, not probabilities in [0, 1]."""
    if not _active() or input.numel() < _MIN_BINARY:
        return
    lo, hi = torch.aminmax(input.detach())
    if bool(lo >= 0) and bool(hi <= 1):
        _warn(f"{loss} got input with every entry in [0, 1]: these look like probabilities (sigmoid already "
              f"applied), but it expects raw logits and applies the sigmoid itself. Pass the logits from "
              f"before sigmoid(...); if you only have probabilities, use binary_cross_entropy instead.")


def check_kl_div(input: Tensor, target: Tensor, log_target: bool) -> None:
    """``kl_div(input, target)``: ``input`` log-probabilities; ``target`` probabilities unless ``log_target``."""
    if not _active() or input.numel() == 0:
        return
    lo, hi = torch.aminmax(input.detach())
    if bool(hi > 0):
        what = ("probabilities (entries in [0, 1]); pass their log, e.g. log_softmax(logits, dim=...) "
                "instead of softmax(...)" if bool(lo >= 0) and bool(hi <= 1) else
                "raw logits; apply log_softmax(input, dim=...) over the distribution's dimension first")
        _warn(f"kl_div expects input to be log-probabilities (all <= 0), but it has entries above 0: it looks "
              f"like {what}.")
    if not log_target and target.numel() and bool(target.detach().amin() < 0):
        _warn("kl_div got a target with negative entries while log_target=False: it looks like "
              "log-probabilities. Pass log_target=True to keep the target in log space, or pass "
              "target.exp().")
