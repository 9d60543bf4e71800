"""Triton kernels: the GPU backend (``impl="triton"``, and ``"compiled"``/``"auto"`` on CUDA tensors).

Each module holds the kernels of one family and a Python wrapper per fused operation, with the same
signature and semantics as the C backend's (:mod:`losskit.ops.cpu`), so that :mod:`losskit.ops._dispatch`
can hand either the same arguments. Nothing here validates user input: the functionals did. The kernels
run on CUDA tensors, and on CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` is set
before this package is imported (how the test suite runs them). ``triton`` is imported lazily, by
:mod:`losskit.ops._dispatch`, only when this backend is chosen.
"""
