r"""Losses on ``torch.distributed``: vocab-parallel cross-entropy and exact loss normalisation across ranks.

Vocab-parallel (tensor-parallel output layer): each rank of a group holds the logits, or the output
layer's rows, of a contiguous range of classes, ranks in order. :func:`vocab_parallel_cross_entropy`
and :func:`vocab_parallel_linear_cross_entropy` return on every rank the loss of the full logits and
to each rank the gradient of its shard, without gathering the logits; the log-sum-exp is combined
stably (the max over ranks, then the sum of rescaled exponentials).

Exact normalisation (data parallelism and gradient accumulation): :func:`global_token_count` and
:func:`global_mean` make the mean loss of a global batch, and its gradients, independent of how its
tokens are split across ranks and micro-batches (the recipe is at the end).

``group``: the vocab-parallel losses split only across a group the caller names: with ``group=None``
(the default) or a group of one rank they run no collective and return the single-process result, so a
call written for one device behaves the same inside a data-parallel job. With tensor and data
parallelism, pass the tensor-parallel group. The normalisation helpers follow torch.distributed
instead: ``group=None`` is the default process group when ``torch.distributed`` is initialised (the
data-parallel world), else this process alone. Every call with an active group checks that the ranks
agree on the target and the options, so a data-parallel group passed by mistake gets an error
("target differs between rank 0 and rank 1"), not a wrong number.

Communication per call, ``P`` target positions, ``a`` bytes per value of the accumulation dtype (4,
or 8 for float64), ``W`` ranks (all in the forward pass, where the gradients are computed; backward
communicates nothing, except as noted):

=====================================  ===============================================================
call                                   collectives
=====================================  ===============================================================
vocab_parallel_cross_entropy           ``all_gather`` 14 int64 (checks, layout); ``all_reduce`` MAX
                                       ``P`` values; ``all_reduce`` SUM ``2P`` (``3P`` with label
                                       smoothing): ``3a`` (``4a``) bytes per token
vocab_parallel_linear_cross_entropy    the same, plus ``all_reduce`` SUM of ``P x D`` values (``a*D``
                                       bytes per token) when ``input`` requires grad (in backward
                                       for "none" with ``linear_weight`` requiring grad)
global_token_count                     ``all_reduce`` SUM of ``1 + W`` float64 (count, error flags)
=====================================  ===============================================================

Validation never deadlocks: a bad argument on any rank (shards that do not add up to ``vocab_size``,
a target outside the vocabulary, options or targets that differ between ranks) raises on every rank.
Under NCCL the small header travels on the current CUDA device (``torch.cuda.set_device``).

Exact normalisation
-------------------
The mean loss of a global batch is the sum of its per-token losses divided by its number of scored
tokens (with class weights: by :math:`\sum w_y`), :math:`L = \sum_i \ell_i / \sum_i w_i` over every
non-ignored token of every micro-batch on every data-parallel rank. When a step is split into pieces
with different numbers of scored tokens (padding, packing, ``ignore_index``), the usual
``reduction="mean"`` per micro-batch, then averaged over micro-batches (gradient accumulation divides
by their number) and over ranks (``DistributedDataParallel`` averages gradients), gives every *piece*
the same weight instead of every *token*: a different loss and different gradients, which also change
with the split. A piece with no scored token even makes it NaN.

The exact recipe, whatever the split: per-token **sums**, one **global count** reduced once, **one
division**::

    count = global_token_count([mb.target for mb in micro_batches], group=dp_group)  # one all_reduce
    for mb in micro_batches:
        loss_sum = LF.cross_entropy(model(mb.input), mb.target, reduction="sum")
        loss = global_mean(loss_sum, count)  # this piece's share of the global mean
        loss.backward()                      # accumulation sums the pieces' gradients
    # Sum the gradients over dp_group (all_reduce SUM): the result is the full batch's gradient.
    # DistributedDataParallel *averages* over its W ranks: call (loss * W).backward() instead.
    # The global mean itself is the sum of every piece's `loss`, over micro-batches and ranks.

``count`` needs the targets of the whole step before the first forward, which a data loader has.
The same works with ``vocab_parallel_cross_entropy(..., reduction="sum")`` in a tensor-parallel group:
its sum is the same on every rank of that group, so count over the data-parallel group only.

Example (one process, two micro-batches of 3 and 1 scored tokens):
    >>> import torch, losskit.functional as LF
    >>> from losskit.distributed import global_mean, global_token_count
    >>> logits = [torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([[0.0, 3.0], [5.0, 0.0]])]
    >>> targets = [torch.tensor([0, 1, 0]), torch.tensor([0, -100])]
    >>> sum(LF.cross_entropy(x, t) for x, t in zip(logits, targets)) / 2  # mean of means: wrong
    tensor(1.7132)
    >>> LF.cross_entropy(torch.cat(logits), torch.cat(targets))  # the full batch
    tensor(1.0455)
    >>> count = global_token_count(targets)
    >>> sum(global_mean(LF.cross_entropy(x, t, reduction="sum"), count) for x, t in zip(logits, targets))
    tensor(1.0455)
"""

from ._cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from ._normalization import global_mean, global_token_count

__all__ = ["global_mean", "global_token_count", "vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]
