"""Tokenize long texts in bounded pieces, with exactly the ids of one whole-text encode.

A ``tokenizers`` encoding costs a few hundred bytes of RAM per token (ids, offsets, token
strings, masks), so encoding a 30 MB document at once takes gigabytes. Here a long text is
cut into pieces of at most ``max_chars`` characters, each encoded on its own, and the ids
concatenated.

Where the cuts go (why the ids are identical): the byte-level BPE pre-tokenizer (GPT-2's
regex, ``add_prefix_space=False``) splits text into words before BPE, and BPE never merges
across words. A cut at position ``p`` with ``text[p-1]`` alphanumeric and ``text[p]`` a
space or newline falls between two words: no alternative of the regex matches a
non-whitespace character followed by whitespace, and the regex has no look-behind, so the
words of ``text[:p]`` and ``text[p:]`` together are the words of ``text``. (A cut inside a
whitespace run would not do: ``"\\n\\n"`` at the end of a piece is one word, but two in
the middle of the text.) Tokenizers of other kinds (a normalizer, a prefix space,
SentencePiece) are encoded whole; so is a piece with no such position in reach.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

#: Characters per piece (about 250k tokens of English; ~70 MB of encoding at most).
MAX_CHARS = 1 << 20


def is_chunkable(tokenizer: Any) -> bool:
    """True when cutting at :func:`cut_points` provably gives the ids of a whole-text encode:
    a byte-level BPE with the GPT-2 regex, no prefix space and no normalizer."""
    try:
        d = json.loads(tokenizer.to_str())
    except Exception:
        return False
    pre = d.get("pre_tokenizer") or {}
    return (d.get("normalizer") is None and (d.get("model") or {}).get("type") == "BPE"
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"))


def _cut_near(text: str, lo: int, hi: int) -> int | None:
    """The last position p in (lo, hi] with text[p-1] alphanumeric and text[p] in ' \\n'."""
    p = hi
    while p > lo:
        q = max(text.rfind(" ", lo + 1, p + 1), text.rfind("\n", lo + 1, p + 1))
        if q <= lo:
            return None
        if text[q - 1].isalnum():
            return q
        p = q - 1
    return None


def pieces(text: str, max_chars: int | None = None) -> Iterator[str]:
    """``text`` cut into pieces of at most ``max_chars`` (default :data:`MAX_CHARS`)
    characters at word boundaries (see the module doc); a piece runs longer only where no
    boundary is found."""
    max_chars = max_chars or MAX_CHARS
    n, start = len(text), 0
    while n - start > max_chars:
        cut = _cut_near(text, start, start + max_chars)
        if cut is None:  # no boundary in reach: look further (this piece is longer)
            cut = _cut_forward(text, start + max_chars)
            if cut is None:
                break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _cut_forward(text: str, frm: int) -> int | None:
    p = frm
    while True:
        qs = [q for q in (text.find(" ", p), text.find("\n", p)) if q > 0]
        if not qs:
            return None
        q = min(qs)
        if text[q - 1].isalnum():
            return q
        p = q + 1


def encode_ids(tokenizer: Any, text: str, max_chars: int | None = None, max_tokens: int | None = None,
               chunkable: bool | None = None) -> Iterator[list[int]]:
    """The ids of ``text`` (no special tokens added) as lists, piece by piece; stops once
    ``max_tokens`` ids have been yielded (the last list may run past it)."""
    if chunkable is None:
        chunkable = is_chunkable(tokenizer)
    parts = pieces(text, max_chars) if chunkable else iter([text])
    total = 0
    for part in parts:
        ids = tokenizer.encode(part, add_special_tokens=False).ids
        total += len(ids)
        yield ids
        if max_tokens is not None and total >= max_tokens:
            return


def encode_prefix(tokenizer: Any, text: str, max_tokens: int, max_chars: int | None = None):
    """(ids, offsets) of the first ``max_tokens`` tokens of ``text`` (offsets into ``text``),
    encoding only as many pieces as needed."""
    chunkable = is_chunkable(tokenizer)
    parts = pieces(text, max_chars) if chunkable else iter([text])
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    base = 0
    for part in parts:
        enc = tokenizer.encode(part, add_special_tokens=False)
        ids += enc.ids
        offsets += [(a + base, b + base) for a, b in enc.offsets]
        base += len(part)
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens], offsets[:max_tokens]


def read_text_prefix(path, tokenizer: Any, max_tokens: int, block_chars: int | None = None) -> str:
    """The start of a UTF-8 text file (undecodable bytes replaced) long enough to give
    ``max_tokens`` tokens, read block by block; the whole file if it is shorter. The text
    returned ends at a word boundary (or the file's end), so its ids are a prefix of the
    whole file's."""
    block_chars = block_chars or MAX_CHARS
    chunkable = is_chunkable(tokenizer)
    buf, counted_upto, count = "", 0, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            block = f.read(block_chars)
            if not block:
                return buf
            buf += block
            if not chunkable:
                continue  # no provable boundary: read it all
            cut = _cut_near(buf, counted_upto, len(buf) - 1)
            if cut is None:
                continue
            count += len(tokenizer.encode(buf[counted_upto:cut], add_special_tokens=False).ids)
            counted_upto = cut
            if count >= max_tokens:
                return buf[:cut]


def with_last(items) -> Iterator[tuple[Any, bool]]:
    """``(item, is_last)`` pairs, lazily."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True
