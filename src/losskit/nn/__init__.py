"""Loss modules mirroring ``torch.nn``: each is a one-call shell over :mod:`losskit.functional`."""

from ._classification import CrossEntropyLoss, FocalLoss, LogSoftmax, NLLLoss, Softmax

__all__ = ["CrossEntropyLoss", "FocalLoss", "LogSoftmax", "NLLLoss", "Softmax"]
