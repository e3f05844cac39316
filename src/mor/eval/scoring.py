"""Batched scoring of token sequences with a MoR checkpoint, independent of lm-eval.

The lm-eval adapter (:mod:`mor.eval.lm_eval_adapter`) is a thin layer over :class:`Scorer`.

Definitions:

* **log-likelihood** of a continuation given a context: the sum over the continuation's
  tokens of ``log p(token | everything before it)`` from one forward pass over
  ``context + continuation`` (minus its last token); ``is_greedy`` is true when every
  continuation token is the arg-max of its distribution. An input longer than
  ``max_length + 1`` tokens is cut from the left (the continuation is kept; if the
  continuation alone is longer, its first tokens are not scored).
* **rolling log-likelihood** of a text (perplexity tasks): the text's tokens are preceded
  by the end-of-text token and predicted exactly once each, in chunks of ``max_length``
  targets. Chunk ``k`` predicts targets ``[k*M, min((k+1)*M, n))`` (``M = max_length``);
  its input is the ``M`` tokens before its last target (fewer at the start of the text),
  so later chunks overlap earlier ones as context and every chunk but the first has a full
  context of ``M`` tokens. The result is the sum over all chunks.
* **greedy generation**: arg-max decoding, stopping at an end-of-text token, at any of the
  ``until`` strings (which are cut off) or after ``max_new_tokens``.

Routing. Top-k expert-choice routing is not causal, and it depends on the sequence length
(k_r = c_r * T), so padding a batch would change the result. With ``routing="topk"`` on an
expert-choice model, sequences are therefore only batched with sequences of exactly the
same length, never padded. The threshold rule, token-choice, recursive and vanilla models
are causal: later tokens (and right padding) never change earlier positions, so any
sequences are batched together with right padding. Generation always uses a causal rule
(``threshold`` for expert-choice), as decoding must.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch
from tqdm import tqdm

from .common import eos_id, is_expert_choice

log = logging.getLogger(__name__)

ROUTINGS = ("topk", "threshold")


class Scorer:
    """Score and generate with ``model`` (a ``MoRForCausalLM``) and its ``tokenizers`` tokenizer.

    ``routing``: ``topk`` or ``threshold`` for expert-choice models (ignored by others);
    ``batch_size``: sequences per forward; ``max_length``: the longest input (default and
    maximum: the model's ``max_position_embeddings``)."""

    def __init__(self, model, tokenizer, *, routing: str = "topk", batch_size: int = 16,
                 max_length: int | None = None, device: torch.device | str | None = None):
        if routing not in ROUTINGS:
            raise ValueError(f"routing={routing!r}; choose one of: {', '.join(ROUTINGS)}")
        cfg = model.config
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.routing = routing
        self.batch_size = max(1, int(batch_size))
        limit = cfg.max_position_embeddings
        self.max_length = min(int(max_length), limit) if max_length else limit
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.eos_id = eos_id(tokenizer)
        # may sequences of different lengths share a (right-padded) batch?
        self.pad_safe = not (is_expert_choice(cfg) and routing == "topk")
        self.gen_routing = "threshold" if is_expert_choice(cfg) else "topk"

    # .................................................................. tokens
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a (context, continuation) pair: trailing spaces of the context move to
        the continuation, the whole text is tokenized once and split after the context's
        tokens (as lm-eval does). If the tokenizer merges across the boundary (the whole
        text does not start with the context's tokens, or nothing is left for the
        continuation) the two parts are tokenized separately instead. An empty context
        becomes the end-of-text token."""
        if context == "":
            return [self.eos_id], self.encode(continuation)
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, self.encode(continuation)

    # .................................................................. core scoring
    def _batches(self, lengths: list[int]) -> Iterable[list[int]]:
        """Indices grouped into batches: longest first; equal lengths only when padding
        would change the routing."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        if self.pad_safe:
            for i in range(0, len(order), self.batch_size):
                yield order[i:i + self.batch_size]
            return
        groups: dict[int, list[int]] = {}
        for i in order:
            groups.setdefault(lengths[i], []).append(i)
        for idx in groups.values():
            for i in range(0, len(idx), self.batch_size):
                yield idx[i:i + self.batch_size]

    @torch.no_grad()
    def score(self, items: list[tuple[list[int], int]], progress: bool = False) -> list[tuple[float, bool]]:
        """``items``: (tokens, n). Sum of log-probabilities of the last ``n`` tokens of
        ``tokens`` given the tokens before them, and whether all n are greedy (arg-max).
        ``progress``: show a progress bar (stderr)."""
        seqs = []
        for toks, n in items:
            if not (1 <= n <= len(toks) - 1) or len(toks) - 1 > self.max_length:
                raise ValueError(f"cannot score the last {n} of {len(toks)} tokens with max_length={self.max_length}")
            seqs.append(list(toks[:-1]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(items)
        bar = tqdm(total=len(items), desc="scoring", unit="seq", disable=not progress, leave=False)
        for b in self._batches([len(s) for s in seqs]):
            T = max(len(seqs[i]) for i in b)
            x = torch.full((len(b), T), self.eos_id, dtype=torch.long)
            for r, i in enumerate(b):
                x[r, :len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
            lg = self.model(x.to(self.device), routing=self.routing).logits
            for r, i in enumerate(b):
                toks, n = items[i]
                L = len(seqs[i])
                part = lg[r, L - n:L].float().log_softmax(-1)
                tgt = torch.tensor(toks[-n:], dtype=torch.long, device=part.device)
                lp = part.gather(-1, tgt[:, None]).squeeze(-1)
                results[i] = (float(lp.sum()), bool((part.argmax(-1) == tgt).all()))
            bar.update(len(b))
        bar.close()
        return results

    # .................................................................. requests
    def loglikelihood_tokens(self, pairs: list[tuple[list[int], list[int]]],
                             progress: bool = False) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), is_greedy) for token-id pairs."""
        items = []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("empty continuation")
            if not ctx:
                ctx = [self.eos_id]
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            items.append((whole, min(len(cont), len(whole) - 1)))
        return self.score(items, progress=progress)

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), is_greedy) for text pairs."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs])

    def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], int]]:
        """The (window tokens, targets scored) chunks of a rolling log-likelihood (module doc)."""
        M = self.max_length
        s = [self.eos_id] + list(tokens)
        n, a, out = len(tokens), 0, []
        while a < n:
            b = min(a + M, n)  # targets a..b-1 are s[a+1..b]
            start = max(0, b - M)
            out.append((s[start:b + 1], b - a))
            a = b
        return out

    def loglikelihood_rolling_tokens(self, docs: list[list[int]], progress: bool = False) -> list[float]:
        items, owner = [], []
        for j, toks in enumerate(docs):
            for w in self.rolling_windows(toks):
                items.append(w)
                owner.append(j)
        sums = [0.0] * len(docs)
        for j, (lp, _) in zip(owner, self.score(items, progress=progress)):
            sums[j] += lp
        return sums

    def loglikelihood_rolling(self, texts: list[str], progress: bool = False) -> list[float]:
        """Sum of log-probabilities of every token of each text (module doc)."""
        return self.loglikelihood_rolling_tokens([self.encode(t) for t in texts], progress=progress)

    # .................................................................. generation
    def generate(self, contexts: list[str], until: list[list[str]] | None = None,
                 max_new_tokens: int | list[int] = 256) -> list[str]:
        """Greedy continuations of ``contexts`` (module doc). Uses ``mor.engine`` when it is
        installed, else repeated full forward passes with the causal routing rule."""
        n = len(contexts)
        until = until if until is not None else [[] for _ in range(n)]
        mx = max_new_tokens if isinstance(max_new_tokens, list) else [int(max_new_tokens)] * n
        texts = self._generate_engine(contexts, until, mx)
        if texts is None:
            texts = self._generate_greedy(contexts, until, mx)
        return [cut_at_stop(t, u) for t, u in zip(texts, until)]

    def _generate_engine(self, contexts: list[str], until: list[list[str]], max_new: list[int]) -> list[str] | None:
        """Greedy generation through ``mor.engine.generate_text`` (KV-cached, depth-wise
        batched) when that module is installed; None if it is absent or cannot take these
        requests (e.g. an empty prompt, or a prompt longer than the context window)."""
        try:
            from mor.engine import SamplingParams, generate_text
        except ImportError:
            return None
        if any(not c for c in contexts) or any(m <= 0 for m in max_new):
            return None
        try:
            params = [SamplingParams(max_tokens=m, temperature=0.0, stop=[x for x in u if x] or None)
                      for m, u in zip(max_new, until)]
            return list(generate_text(self.model, self.tokenizer, list(contexts), params,
                                      max_batch=self.batch_size))
        except Exception as e:  # noqa: BLE001 - fall back to the reference decoder
            log.warning("mor.engine could not run these requests (%s: %s); using full-forward greedy decoding",
                        type(e).__name__, e)
            return None

    @torch.no_grad()
    def _generate_greedy(self, contexts: list[str], until: list[list[str]], max_new: list[int]) -> list[str]:
        """Greedy decoding by repeated full forwards (causal routing), batched with right padding."""
        ids = [self.encode(c) or [self.eos_id] for c in contexts]
        gen: list[list[int]] = [[] for _ in contexts]
        done = [m <= 0 for m in max_new]
        texts = ["" for _ in contexts]
        while not all(done):
            active = [i for i in range(len(contexts)) if not done[i]]
            for k in range(0, len(active), self.batch_size):
                b = active[k:k + self.batch_size]
                seqs = [(ids[i] + gen[i])[-self.max_length:] for i in b]
                T = max(len(s) for s in seqs)
                x = torch.full((len(b), T), self.eos_id, dtype=torch.long)
                for r, s in enumerate(seqs):
                    x[r, :len(s)] = torch.tensor(s, dtype=torch.long)
                lg = self.model(x.to(self.device), routing=self.gen_routing).logits
                for r, i in enumerate(b):
                    nxt = int(lg[r, len(seqs[r]) - 1].argmax())
                    if nxt == self.eos_id:
                        done[i] = True
                        continue
                    gen[i].append(nxt)
                    texts[i] = self.decode(gen[i])
                    if len(gen[i]) >= max_new[i] or any(u and u in texts[i] for u in until[i]):
                        done[i] = True
        return texts


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for u in until:
        if u:
            j = text.find(u)
            if j != -1:
                cut = min(cut, j)
    return text[:cut]

