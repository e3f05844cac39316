"""Validation NLL and perplexity on held-out text.

Definition (what ``mor eval --data`` reports):

1. The text is turned into one token stream the way training sees it: every document of
   the source is tokenized with the checkpoint's tokenizer and followed by the
   end-of-text token, and the documents are concatenated. A prepared data directory
   (written by ``mor prepare``) contributes its ``val`` split as it is.
2. The stream (optionally cut to its first ``max_tokens`` tokens) is split into windows of
   ``seq_len + 1`` tokens at stride ``seq_len`` - the training windows - so every token
   after the first is predicted exactly once, from the tokens before it in its window.
   When ``seq_len`` does not divide the predictions, the last window is the stream's last
   ``seq_len + 1`` tokens and scores only the tokens no earlier window scored: the
   remainder is scored once, with as much left context as a window holds, and every window
   has the training length (top-k routing sees the sequence length it was trained on).
   A stream shorter than one window is one window of its own length
   (:func:`nll_windows`).
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
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional

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
    from ..data import DataError, load_meta, read_split

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
        stream = read_split(d, split, max_tokens)
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


def nll_windows(num_tokens: int, seq_len: int) -> list[tuple[int, int, int]]:
    """The evaluation windows of a stream of ``num_tokens`` tokens (module docstring, rule 2)
    as ``(start, length, scored)``: the window's inputs are ``stream[start:start + length]``,
    its targets the next tokens, and only its last ``scored`` targets count. Every target
    (token 1 .. num_tokens - 1) is scored by exactly one window."""
    n_pred = num_tokens - 1
    if n_pred < 1:
        return []
    length = min(seq_len, n_pred)
    full = n_pred // length
    out = [(i * length, length, length) for i in range(full)]
    rest = n_pred - full * length
    if rest:
        out.append((n_pred - length, length, rest))
    return out


def _shard(windows: list, batch_size: int, rank: int, world_size: int) -> list:
    """This rank's windows: global batches of ``batch_size * world_size`` windows, rank ``r``
    taking its contiguous slice of each; the list is first padded (with windows that score
    nothing) to whole global batches, so that every rank runs the same number of forwards."""
    if world_size == 1:
        return windows
    per = batch_size * world_size
    padded = windows + [(windows[0][0], windows[0][1], 0)] * (-len(windows) % per)
    return [w for g in range(0, len(padded), per) for w in padded[g + rank * batch_size: g + (rank + 1) * batch_size]]


@torch.no_grad()
def evaluate_nll(model, stream: np.ndarray, *, seq_len: int, routing: str = "topk", batch_size: int = 8,
                 device: torch.device | str | None = None, progress: bool = False, rank: int = 0,
                 world_size: int = 1, forward: Callable[[torch.Tensor], Any] | None = None) -> dict[str, Any]:
    """Mean NLL (nats/token) of ``stream`` under ``model`` with the given routing rule, plus
    router diagnostics (see the module docstring for the exact definition).

    ``nll_sum`` and ``tokens`` are the summed NLL and the number of scored targets. With
    ``world_size > 1`` the windows are shared out between the ranks (:func:`_shard`) and the
    result covers this rank's share: summing ``nll_sum`` and ``tokens`` over the ranks gives
    the one-process numbers (the trainer all-reduces them). ``forward`` replaces the model's own
    forward (``model(x, routing=...)``), e.g. a depth-capped :func:`mor.eval.depth.forward_depth`;
    it returns an object with ``logits`` and optionally ``depth`` and ``router_stats``."""
    cfg = model.config
    if seq_len > cfg.max_position_embeddings:
        raise CheckpointError(f"seq_len={seq_len} exceeds the model's max_position_embeddings="
                              f"{cfg.max_position_embeddings}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    nr = cfg.num_recursions
    caps = cfg.resolved_capacities() if is_expert_choice(cfg) else [1.0] * nr
    all_windows = nll_windows(len(stream), seq_len)
    windows = _shard(all_windows, batch_size, rank, world_size) if all_windows else []
    tot_nll, tot_tok = 0.0, 0
    dead, samp, frac = 0.0, torch.zeros(nr, dtype=torch.float64), torch.zeros(nr, dtype=torch.float64)
    hist = torch.zeros(nr + 2, dtype=torch.long)
    maxvio, has = 0.0, set()
    t0 = time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(windows), desc=f"nll[{routing}]", leave=False, unit="win")
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        buf = np.stack([stream[start:start + length + 1] for start, length, _ in chunk])
        x = torch.from_numpy(buf[:, :-1]).to(device)
        y = torch.from_numpy(buf[:, 1:]).to(device)
        scored = torch.zeros_like(y, dtype=torch.bool)
        for row, (_, length, n_scored) in enumerate(chunk):
            scored[row, length - n_scored:] = True
        out = forward(x) if forward is not None else model(x, routing=model_routing(routing))
        logits = out.logits.float()
        tot_nll += functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.masked_fill(~scored, -100).reshape(-1),
                                   ignore_index=-100, reduction="sum").item()
        ntok = int(scored.sum())
        tot_tok += ntok
        st = getattr(out, "router_stats", None) or {}
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
            hist += torch.bincount(out.depth[scored].cpu().clamp(max=nr + 1), minlength=nr + 2)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    nll = tot_nll / tot_tok if tot_tok else float("nan")
    res: dict[str, Any] = {
        "routing": routing,
        "nll": nll,
        "ppl": math.exp(min(nll, 50.0)),
        "nll_sum": tot_nll,
        "tokens": tot_tok,
        "windows": len(all_windows),
        "seq_len": seq_len,
        "seconds": round(time.time() - t0, 3),
    }
    if not tot_tok:
        return res
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
