"""Loss modules mirroring ``torch.nn``: each is a one-call shell over :mod:`losskit.functional`."""

from ._binary import BCELoss, BCEWithLogitsLoss, MultiLabelSoftMarginLoss, SigmoidFocalLoss
from ._classification import CrossEntropyLoss, FocalLoss, LogSoftmax, NLLLoss, Softmax
from ._divergence import Entropy, KLDivLoss
from ._linear import LinearCrossEntropyLoss
from ._regression import MSELoss, RMSELoss

__all__ = ["BCELoss", "BCEWithLogitsLoss", "CrossEntropyLoss", "Entropy", "FocalLoss", "KLDivLoss",
           "LinearCrossEntropyLoss", "LogSoftmax", "MSELoss", "MultiLabelSoftMarginLoss", "NLLLoss",
           "RMSELoss", "SigmoidFocalLoss", "Softmax"]
