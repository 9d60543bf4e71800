"""The fused operations behind the functional API, and the backends that compute them.

``functional/`` validates a call and hands it to a driver here (``classification``, ``softmax``,
``elementwise``, ``linear_xent``; the vocab-parallel loss in :mod:`losskit.distributed`). A driver asks
:mod:`._dispatch`, the one table of ``(operation, device, impl) -> backend``, who computes it:

* ``cpu/``: the C extension (``_native*.c``/``.h``) and its Python wrappers;
* ``triton/``: the Triton kernels (CUDA; CPU under ``TRITON_INTERPRET=1``);
* ``reference/``: the pure-torch block-wise path, any device: the oracle of the tests;
* ``composite.py``: torch's own loss, or a short composite, where no kernel runs;

and :mod:`._library` registers the kernels as torch custom ops. Every backend of an operation takes
the same arguments, and every fast path states the reference expression it computes. ``blocks`` holds
the shape helpers they share.
"""
