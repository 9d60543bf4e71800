"""The core: every loss as a function, drop-in for ``torch.nn.functional`` where torch has the loss."""

from ._classification import cross_entropy, focal_loss, nll_loss
from ._divergence import entropy, kl_div
from ._softmax import log_softmax, softmax

__all__ = ["cross_entropy", "entropy", "focal_loss", "kl_div", "log_softmax", "nll_loss", "softmax"]
