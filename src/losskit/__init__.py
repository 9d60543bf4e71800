"""losskit: loss functions for PyTorch, exact to ``torch.nn``, with the gradient fused into the forward pass.

``import losskit.functional as LF`` and ``import losskit.nn as LN`` stand in for ``torch.nn.functional``
and ``torch.nn`` for the losses they hold.
"""

from . import functional, nn

__version__ = "0.1.0"

__all__ = ["__version__", "functional", "nn"]
