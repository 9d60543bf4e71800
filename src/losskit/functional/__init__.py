"""The core: every loss as a function, drop-in for ``torch.nn.functional`` where torch has the loss."""

from ._binary import (binary_cross_entropy, binary_cross_entropy_with_logits, multilabel_soft_margin_loss,
                      sigmoid_focal_loss)
from ._classification import cross_entropy, focal_loss, nll_loss
from ._divergence import entropy, kl_div
from ._linear_cross_entropy import LinearCrossEntropyResult, linear_cross_entropy, linear_cross_entropy_with_stats
from ._regression import mse_loss, rmse_loss
from ._softmax import log_softmax, softmax

__all__ = ["binary_cross_entropy", "binary_cross_entropy_with_logits", "cross_entropy", "entropy",
           "focal_loss", "kl_div", "linear_cross_entropy", "linear_cross_entropy_with_stats",
           "LinearCrossEntropyResult", "log_softmax", "mse_loss", "multilabel_soft_margin_loss", "nll_loss",
           "rmse_loss", "sigmoid_focal_loss", "softmax"]
