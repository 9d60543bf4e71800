"""losskit: loss functions for PyTorch, exact to ``torch.nn``, with the gradient fused into the forward pass.

``import losskit.functional as LF`` and ``import losskit.nn as LN`` stand in for ``torch.nn.functional``
and ``torch.nn`` for the losses they hold.
"""

from . import functional, nn
from ._checks import no_sync
from ._learner import LosskitWarning, checks_enabled, set_checks

__version__ = "0.1.0"  # the one place the version is kept: pyproject.toml reads it from here

__all__ = ["LosskitWarning", "__version__", "checks_enabled", "functional", "nn", "no_sync", "set_checks"]
