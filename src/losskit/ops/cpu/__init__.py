"""The C backend: the compiled CPU kernels (``_native*.c`` and the shared ``_native*.h`` headers, one
extension module per family, built by ``pip install``) and the Python wrapper of each (``native*.py``),
which checks every operand it hands to C. ``native`` loads the extensions and allocates outputs."""
