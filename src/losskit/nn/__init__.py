"""Loss modules mirroring ``torch.nn``: each is a one-call shell over :mod:`losskit.functional`."""

from ._classification import CrossEntropyLoss, FocalLoss, LogSoftmax, NLLLoss, Softmax
from ._divergence import Entropy, KLDivLoss

__all__ = ["CrossEntropyLoss", "Entropy", "FocalLoss", "KLDivLoss", "LogSoftmax", "NLLLoss", "Softmax"]
