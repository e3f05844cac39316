"""The Hugging Face wrapper classes of a MoR model (``MoRConfig``, ``MoRForCausalLM``).

These two modules are the remote code of an exported directory: ``mor export`` copies them,
with the library modules they import (found by parsing imports, see
:mod:`mor.interop.bundle`), into the export so transformers loads it without ``mor``. With
``mor`` installed they are also registered with the transformers Auto classes
(:func:`mor.interop.register_hf`). They import transformers, so import them only through
those two paths.
"""
