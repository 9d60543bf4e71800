"""Fast paths behind the functional API.

Each kernel states the reference expression it computes; tests use that expression as the oracle and
benchmarks as the baseline. ``rows`` holds the pure-torch row kernels (any device); ``blocks`` splits an
``(N, C, d1, ..., dk)`` tensor into cache-sized ``(n, C)`` row blocks; ``elementwise`` walks the
elementwise losses in cache-sized pieces; ``linear_xent`` is the chunked head + cross-entropy. ``native`` runs the compiled CPU
row kernels (the C extension ``_native``, built with the package; ``impl="compiled"``). ``native_binary``
runs the compiled binary losses (``_native_binary``), fed by ``native_elementwise``, the compiled
elementwise losses' driver (one call over contiguous operands, else contiguous pieces), as is
``native_pointwise`` (mse_loss, rmse_loss and kl_div, ``_native_pointwise``). ``native_softmax``
runs the compiled softmax, log_softmax, entropy and nll_loss rows (``_native_softmax``).
"""
