"""Integrations with other libraries, each in its own module and imported only when asked for.

* :mod:`losskit.integrations.transformers`: fused causal-LM loss for Hugging Face transformers models
  (``pip install 'losskit[hf]'``).

Nothing is imported here, so ``import losskit`` never pulls in an optional dependency.
"""
