"""Validation NLL and perplexity on held-out text.

Definition (what ``mor eval --data`` reports):

1. The text is turned into one token stream the way training sees it: every document of
   the source is tokenized with the checkpoint's tokenizer and followed by the
   end-of-text token, and the documents are concatenated. A prepared data directory
   (written by ``mor prepare``) contributes its ``val`` split as it is.
2. The stream (optionally cut to its first ``max_tokens`` tokens) is split into windows of
   ``seq_len + 1`` tokens at stride ``seq_len`` - the training windows - so every token
   after the first is predicted exactly once, from the tokens before it in its window. A
   final shorter window takes the remaining tokens (its routing sees a shorter sequence).
3. NLL is the mean over all predicted tokens of ``-log p(token)`` in nats; perplexity is
   ``exp(NLL)``.

Expert-choice MoR models are scored with both routing rules: ``topk`` (the training-time
rule, non-causal, how the paper reports validation NLL) and ``threshold`` (the causal rule
used for generation: a token continues while its router logit is > 0). Alongside each
number come the router diagnostics of that pass: the dead-token ratio (positions never
selected at the last recursion in a batch, the model's definition, averaged over batches
weighted by tokens), the sampling accuracy (top-k pass only: agreement of the threshold rule
with the top-k selection, per recursion and averaged over the recursions whose capacity is
below 1, where the rule actually decides), per-recursion selected fractions, mean depth and
the depth histogram. Vanilla, recursive and token-choice models give one number.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import textchunks
from ..checkpoint import CheckpointError
from .common import eos_id, is_expert_choice, model_routing, routing_modes


def _is_prepared_dir(source: str) -> bool:
    p = Path(source).expanduser()
    return p.is_dir() and (p / "meta.json").is_file() and any(p.glob("*_000000.bin"))


def token_stream(source: str, tokenizer, *, text_field: str = "text", max_tokens: int | None = None,
                 split: str = "val") -> tuple[np.ndarray, dict[str, Any]]:
    """The evaluation token stream of ``source`` and a description of it.

    ``source`` is anything ``mor prepare`` accepts (``shakespeare``, files, folders,
    ``hf:...``), tokenized with ``tokenizer`` with the end-of-text token after each
    document, or a prepared data directory, whose ``split`` (default ``val``) is read as is;
    its tokenizer must have the same vocabulary as ``tokenizer``."""
    from ..data import DataError, load_meta

    if _is_prepared_dir(source):
        d = Path(source).expanduser()
        meta = load_meta(d)
        if split not in meta["splits"]:
            raise DataError(f"{d} has no {split!r} split (splits: {', '.join(meta['splits'])})")
        if tokenizer is not None:
            from ..data import load_tokenizer as load_data_tokenizer

            data_tok = load_data_tokenizer(d / meta.get("tokenizer_file", "tokenizer.json"))
            if data_tok.get_vocab() != tokenizer.get_vocab():
                raise DataError(f"{d} was tokenized with a different tokenizer than the checkpoint's; "
                                "pass the raw text source instead so it is tokenized with the checkpoint's")
        dtype = np.dtype(meta["dtype"])
        parts, total = [], 0
        for shard in meta["splits"][split]["shards"]:
            if max_tokens is not None and total >= max_tokens:
                break
            arr = np.memmap(d / shard["file"], dtype=dtype, mode="r")
            take = len(arr) if max_tokens is None else min(len(arr), max_tokens - total)
            parts.append(np.asarray(arr[:take], dtype=np.int64))
            total += take
        stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        info = {"source": str(d), "kind": "prepared", "split": split,
                "documents": meta["splits"][split].get("documents")}
    else:
        from ..data import iter_documents

        if tokenizer is None:
            raise CheckpointError("tokenizing a text source needs the checkpoint's tokenizer.json")
        eos = eos_id(tokenizer)
        parts, total, ndocs, batch = [], 0, 0, []

        def flush():
            nonlocal total, ndocs
            for enc in tokenizer.encode_batch(batch, add_special_tokens=False):
                ids = enc.ids + [eos]
                parts.append(np.asarray(ids, dtype=np.int64))
                total += len(ids)
                ndocs += 1
            batch.clear()

        for doc in iter_documents(source, text_field=text_field):
            if len(doc) > textchunks.MAX_CHARS:  # a long document: in bounded pieces, only as far as needed
                flush()
                for ids in textchunks.encode_ids(tokenizer, doc, max_tokens=None if max_tokens is None
                                                 else max_tokens - total):
                    parts.append(np.asarray(ids, dtype=np.int64))
                    total += len(ids)
                parts.append(np.asarray([eos], dtype=np.int64))
                total, ndocs = total + 1, ndocs + 1
            else:
                batch.append(doc)
            if len(batch) >= 64:
                flush()
            if max_tokens is not None and total >= max_tokens:
                break
        if batch and (max_tokens is None or total < max_tokens):
            flush()
        stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        info = {"source": source if not Path(source).expanduser().exists()
                else str(Path(source).expanduser().resolve()), "kind": "text", "documents": ndocs}
    if max_tokens is not None:
        stream = stream[:max_tokens]
    if len(stream) < 2:
        from ..data import DataError

        raise DataError(f"{source} gives {len(stream)} token(s); NLL needs at least 2")
    info["tokens"] = int(len(stream))
    return stream, info


def window_starts(num_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """(start, predicted tokens) of the evaluation windows of a stream of ``num_tokens``:
    full windows of ``seq_len`` predictions at stride ``seq_len``, then one shorter window
    for the rest."""
    n_pred = num_tokens - 1
    out = [(s, seq_len) for s in range(0, (n_pred // seq_len) * seq_len, seq_len)]
    rest = n_pred - (n_pred // seq_len) * seq_len
    if rest > 0:
        out.append((n_pred - rest, rest))
    return out


@torch.no_grad()
def evaluate_nll(model, stream: np.ndarray, *, seq_len: int, routing: str = "topk", batch_size: int = 8,
                 device: torch.device | str | None = None, progress: bool = False) -> dict[str, Any]:
    """Mean NLL (nats/token) of ``stream`` under ``model`` with the given routing rule, plus
    router diagnostics (see the module docstring for the exact definition)."""
    cfg = model.config
    if seq_len > cfg.max_position_embeddings:
        raise CheckpointError(f"seq_len={seq_len} exceeds the model's max_position_embeddings="
                              f"{cfg.max_position_embeddings}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    nr = cfg.num_recursions
    caps = cfg.resolved_capacities() if is_expert_choice(cfg) else [1.0] * nr
    wins = window_starts(len(stream), seq_len)
    # group windows of equal length (top-k routing depends on the sequence length)
    groups: dict[int, list[int]] = {}
    for s, n in wins:
        groups.setdefault(n, []).append(s)
    tot_nll, tot_tok = 0.0, 0
    dead, samp, frac = 0.0, torch.zeros(nr, dtype=torch.float64), torch.zeros(nr, dtype=torch.float64)
    hist = torch.zeros(nr + 2, dtype=torch.long)
    maxvio, has = 0.0, set()
    t0 = time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(wins), desc=f"nll[{routing}]", leave=False, unit="win")
    for n, starts in groups.items():
        for i in range(0, len(starts), batch_size):
            chunk = starts[i:i + batch_size]
            buf = np.stack([stream[s:s + n + 1] for s in chunk])
            x = torch.from_numpy(buf[:, :-1]).to(device)
            y = torch.from_numpy(buf[:, 1:]).to(device)
            out = model(x, routing=model_routing(routing))
            logits = out.logits.float()
            tot_nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
            ntok = y.numel()
            tot_tok += ntok
            st = out.router_stats
            if "dead_token_ratio" in st:
                dead += float(st["dead_token_ratio"]) * ntok
                has.add("dead")
            if "sampling_accuracy" in st:
                samp += st["sampling_accuracy"].double().cpu() * ntok
                has.add("samp")
            if "selected_fraction" in st:
                frac += st["selected_fraction"].double().cpu() * ntok
                has.add("frac")
            if "max_violation" in st:
                maxvio += float(st["max_violation"]) * ntok
                has.add("maxvio")
            if out.depth is not None:
                hist += torch.bincount(out.depth.reshape(-1).cpu().clamp(max=nr + 1), minlength=nr + 2)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    nll = tot_nll / tot_tok
    res: dict[str, Any] = {
        "routing": routing,
        "nll": nll,
        "ppl": math.exp(min(nll, 50.0)),
        "tokens": tot_tok,
        "windows": len(wins),
        "seq_len": seq_len,
        "seconds": round(time.time() - t0, 3),
    }
    if "dead" in has:
        res["dead_token_ratio"] = dead / tot_tok
    if "samp" in has:
        per = (samp / tot_tok).tolist()
        decided = [a for a, c in zip(per, caps) if c < 1.0]
        res["sampling_accuracy"] = sum(decided) / len(decided) if decided else sum(per) / len(per)
        res["sampling_accuracy_per_recursion"] = per
    if "frac" in has:
        res["selected_fraction"] = (frac / tot_tok).tolist()
    if "maxvio" in has:
        res["max_violation"] = maxvio / tot_tok
    if hist.sum() > 0:
        h = hist[: nr + 1].tolist()
        res["depth_histogram"] = h  # tokens per depth 0..N_r
        res["mean_depth"] = sum(d * c for d, c in enumerate(h)) / max(1, sum(h))
    return res


def run_nll(model, tokenizer, source: str, *, seq_len: int | None = None, batch_size: int = 8,
            max_tokens: int | None = None, text_field: str = "text", routing: str = "both",
            split: str = "val", device=None, progress: bool = False) -> dict[str, Any]:
    """``mor eval --data``: the stream of ``source``, scored with every relevant routing mode.

    ``routing``: ``both`` (every mode that matters for the model), ``topk`` or ``threshold``;
    ``split``: the split read from a prepared data directory.
    The returned dict has ``nll``/``ppl`` of the paper's mode (top-k; the only mode for
    models without expert-choice routing) and a ``routing`` dict with every mode's result."""
    cfg = model.config
    seq_len = int(seq_len or cfg.max_position_embeddings)
    stream, info = token_stream(source, tokenizer, text_field=text_field, max_tokens=max_tokens, split=split)
    modes = routing_modes(cfg)
    if routing != "both" and len(modes) > 1:
        if routing not in modes:
            raise ValueError(f"routing={routing!r}; choose one of: both, {', '.join(modes)}")
        modes = [routing]
    per = {m: evaluate_nll(model, stream, seq_len=seq_len, routing=m, batch_size=batch_size, device=device,
                           progress=progress) for m in modes}
    main = per.get("topk", per.get("default", next(iter(per.values()))))
    return {**info, "seq_len": seq_len, "nll": main["nll"], "ppl": main["ppl"], "routing": per}


def source_key(info: dict[str, Any], seq_len: int, max_tokens: int | None) -> str:
    """The key of an NLL result in results.json: the source, window length and token cap."""
    key = os.fspath(info["source"])
    if info.get("kind") == "prepared":
        key += f"[{info['split']}]"
    key += f"@seq{seq_len}"
    if max_tokens:
        key += f"/max{max_tokens}"
    return key
