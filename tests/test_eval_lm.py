"""The lm-eval adapter: log-likelihoods, greedy flags, rolling log-likelihoods and generation
against direct computations with the model; registration with lm-eval."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from mor import checkpoint as ckpt

# lm-eval is a test dependency (`make install` installs .[test,eval]); without it this fails loudly
from lm_eval.api.instance import Instance

from mor.eval.lm_eval_adapter import MoRLM
from helpers import make_checkpoint, random_docs



@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("lm") / "mor", seed=1)


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def direct_logprobs(model, ids: list[int], routing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(ids[i+1] | ids[:i+1]) and the arg-max predictions, from one unbatched forward."""
    x = torch.tensor([ids[:-1]])
    with torch.no_grad():
        lp = functional.log_softmax(model(x, routing=routing).logits[0].float(), dim=-1)
    tgt = torch.tensor(ids[1:])
    return lp.gather(-1, tgt[:, None]).squeeze(-1), lp.argmax(-1)


@pytest.mark.parametrize("routing", ["topk", "threshold"])
def test_loglikelihood_equals_sum_of_token_logprobs(ck, routing):
    model, tok = ckpt.load_model(ck), ckpt.load_tokenizer(ck)
    lm = MoRLM(pretrained=str(ck), model=model, tokenizer=tok, routing=routing, batch_size=3)
    eos = tok.token_to_id("<|endoftext|>")
    pairs = []
    for i, t in enumerate(random_docs(7, 30, 99)):  # contexts and continuations of many lengths
        w = t.split(" ")
        pairs.append((" ".join(w[:3 + 2 * i]), " " + " ".join(w[3 + 2 * i:5 + 3 * i])))
    pairs.append(("", " the quick brown fox"))  # empty context -> end-of-text token as context
    pairs.append(("the lazy dog ", "jumps"))  # trailing space moves to the continuation
    pairs.append(("the lazy do", "g jumps"))  # a boundary inside a word
    res = lm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    assert len(res) == len(pairs)
    for (ctx, cont), (ll, greedy) in zip(pairs, res):
        if ctx:
            c2 = ctx.rstrip()
            cont2 = ctx[len(c2):] + cont
            ctx_ids = tok.encode(c2).ids
            whole = tok.encode(c2 + cont2).ids
            if whole[:len(ctx_ids)] != ctx_ids:  # tokenizer merged across the boundary
                whole = ctx_ids + tok.encode(cont2).ids
            n_ctx = len(ctx_ids)
        else:
            whole = [eos] + tok.encode(cont).ids
            n_ctx = 1
        assert len(whole) > n_ctx
        lp, am = direct_logprobs(model, whole, routing)
        cont_ids = torch.tensor(whole[n_ctx:])
        assert ll == pytest.approx(lp[n_ctx - 1:].sum().item(), abs=1e-4)
        assert greedy == bool((am[n_ctx - 1:] == cont_ids).all())


def test_is_greedy_and_truncation(ck):
    model, tok = ckpt.load_model(ck), ckpt.load_tokenizer(ck)
    lm = MoRLM(model=model, tokenizer=tok, routing="threshold", batch_size=4)
    ctx = tok.encode(random_docs(1, 12, 5)[0]).ids
    lp, am = direct_logprobs(model, ctx + [0], "threshold")
    best = int(am[-1])
    other = (best + 1) % 300
    (ll_b, g_b), (ll_o, g_o) = lm._loglikelihood_tokens([(None, ctx, [best]), (None, ctx, [other])])
    assert g_b and not g_o and ll_b > ll_o
    # a two-token greedy continuation
    lp2, am2 = direct_logprobs(model, ctx + [best, 0], "threshold")
    (_, g2), = lm._loglikelihood_tokens([(None, ctx, [best, int(am2[-1])])])
    assert g2
    # inputs longer than the context window keep the last max_length + 1 tokens
    long_ctx = tok.encode(" ".join(random_docs(3, 40, 6))).ids
    assert len(long_ctx) > 64
    cont = long_ctx[-5:]
    (ll, _), = lm._loglikelihood_tokens([(None, long_ctx[:-5], cont)])
    lp, _ = direct_logprobs(model, long_ctx[-65:], "threshold")
    assert ll == pytest.approx(lp[-5:].sum().item(), abs=1e-4)


@pytest.mark.parametrize("routing", ["topk", "threshold"])
def test_rolling_loglikelihood_over_long_texts(ck, routing):
    model, tok = ckpt.load_model(ck), ckpt.load_tokenizer(ck)
    lm = MoRLM(model=model, tokenizer=tok, routing=routing, batch_size=2, max_length=24)
    eos = tok.token_to_id("<|endoftext|>")
    short = "the quick brown fox"
    long = " ".join(random_docs(2, 35, 8))
    res = lm.loglikelihood_rolling([req("loglikelihood_rolling", short), req("loglikelihood_rolling", long)])
    # short text: one forward over [eos] + tokens
    ids = [eos] + tok.encode(short).ids
    assert len(ids) - 1 <= 24
    lp, _ = direct_logprobs(model, ids, routing)
    assert res[0] == pytest.approx(lp.sum().item(), abs=1e-4)
    # long text: targets in chunks of M=24, each chunk's input the M tokens before its last target
    toks = tok.encode(long).ids
    assert len(toks) > 3 * 24
    s, M, total, covered = [eos] + toks, 24, 0.0, []
    for a in range(0, len(toks), M):
        b = min(a + M, len(toks))
        window = s[max(0, b - M):b + 1]
        lp, _ = direct_logprobs(model, window, routing)
        total += lp[-(b - a):].sum().item()
        covered += list(range(a, b))
    assert covered == list(range(len(toks)))  # every token predicted exactly once
    assert res[1] == pytest.approx(total, abs=1e-3)
    # the last chunk has a full context of M tokens
    assert len(lm.scorer.rolling_windows(toks)[-1][0]) == M + 1


@pytest.mark.parametrize("path", ["engine", "full_forward"])
def test_generate_until_is_greedy_and_stops(ck, path, monkeypatch):
    import sys

    from mor.eval.scoring import Scorer

    if path == "engine":  # mor.engine decodes the batch; the full-forward fallback must not be used
        pytest.importorskip("mor.engine")
        monkeypatch.setattr(Scorer, "_generate_greedy", lambda *a: pytest.fail("engine not used"))
    else:
        monkeypatch.setitem(sys.modules, "mor.engine", None)
    model, tok = ckpt.load_model(ck), ckpt.load_tokenizer(ck)
    lm = MoRLM(model=model, tokenizer=tok, batch_size=2)
    prompts = ["the quick brown", "seven wizards quietly hum . the lazy"]
    out = lm.generate_until([req("generate_until", p, {"until": [], "max_gen_toks": 6}) for p in prompts])
    for p, text in zip(prompts, out):
        ids = tok.encode(p).ids
        gen = []
        for _ in range(6):  # reference: full forwards with the causal rule, arg-max
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids + gen]), routing="threshold").logits[0, -1].argmax())
            if nxt == tok.token_to_id("<|endoftext|>"):
                break
            gen.append(nxt)
        assert text == tok.decode(gen)
    if path == "engine":
        monkeypatch.undo()  # (the engine may decline single requests; the fallback then decodes)
    # a stop string cuts the text before it
    stop = out[0][2:4] if len(out[0]) >= 4 else out[0][-1:]
    cut = lm.generate_until([req("generate_until", prompts[0], {"until": [stop], "max_gen_toks": 6})])[0]
    assert cut == out[0][:out[0].find(stop)]


def test_registered_with_lm_eval(ck):
    from lm_eval.api.registry import get_model

    cls = get_model("mor")
    assert cls is MoRLM
    lm = cls.create_from_arg_string(f"pretrained={ck},routing=threshold,max_length=32",
                                    {"batch_size": "auto", "device": "cuda:0"})
    assert lm.routing == "threshold" and lm.max_length == 32 and lm.batch_size == 16
    assert str(lm.device) == "cpu" or torch.cuda.is_available()
    with pytest.raises(ValueError, match="pretrained"):
        cls()
