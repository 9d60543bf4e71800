"""The reference backend: pure torch, any device, cache-sized blocks and pieces, nothing input-sized but
the gradient. Its expressions are the oracle of the tests and the baseline of the benchmarks."""
