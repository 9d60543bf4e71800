"""The core: every loss as a function, drop-in for ``torch.nn.functional`` where torch has the loss."""

from ._classification import cross_entropy, focal_loss, nll_loss
from ._softmax import log_softmax, softmax

__all__ = ["cross_entropy", "focal_loss", "log_softmax", "nll_loss", "softmax"]
