"""Losses on ``torch.distributed``: vocab-parallel cross-entropy and exact loss normalisation across ranks.

Vocab-parallel (tensor-parallel output layer): each rank of a group holds the logits, or the output
layer's rows, of a contiguous range of classes, ranks in order. :func:`vocab_parallel_cross_entropy`
and :func:`vocab_parallel_linear_cross_entropy` return on every rank the loss of the full logits and
to each rank the gradient of its shard, without gathering the logits; the log-sum-exp is combined
stably (the max over ranks, then the sum of rescaled exponentials).

Exact normalisation (data parallelism and gradient accumulation): :func:`global_token_count` and
:func:`global_mean` make the mean loss of a global batch, and its gradients, independent of how its
tokens are split across ranks and micro-batches (see :mod:`losskit.distributed._normalization`).

``group``: as everywhere in ``torch.distributed``, ``None`` means the default process group when
``torch.distributed`` is initialised; when it is not, the call is a single-process one and runs no
collective. A group of one rank runs no collective either.

Communication per call, ``P`` target positions, ``a`` bytes per value of the accumulation dtype (4,
or 8 for float64), ``W`` ranks (all forward; backward communicates nothing):

=====================================  ===============================================================
call                                   collectives
=====================================  ===============================================================
vocab_parallel_cross_entropy           ``all_gather`` 14 int64 (checks, layout); ``all_reduce`` MAX
                                       ``P`` values; ``all_reduce`` SUM ``2P`` (``3P`` with label
                                       smoothing): ``3a`` (``4a``) bytes per token
vocab_parallel_linear_cross_entropy    the same, plus ``all_reduce`` SUM of ``P x D`` values (``a*D``
                                       bytes per token) when ``input`` requires grad
global_token_count                     ``all_reduce`` SUM of ``1 + W`` float64 (count, error flags)
=====================================  ===============================================================

Validation never deadlocks: a bad argument on any rank (shards that do not add up to ``vocab_size``,
a target outside the vocabulary, options or targets that differ between ranks) raises on every rank.
Under NCCL the small header travels on the current CUDA device (``torch.cuda.set_device``).
"""

from ._cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from ._normalization import global_mean, global_token_count

__all__ = ["global_mean", "global_token_count", "vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]
