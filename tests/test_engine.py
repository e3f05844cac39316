"""Inference engine (issue: causal MoR decoding, recursion-aware KV caches, continuous
depth-wise batching): cached decoding equals uncached threshold forwards, batching does
not change results, invalid requests fail cleanly, stats are observable."""

from __future__ import annotations

import json
import string

import pytest
import torch

import mor
from mor import MoRForCausalLM, preset
from mor.engine import Engine, EngineStats, LLM, RequestError, SamplingParams, generate_text
from mor.engine.sampling import filter_logits, sample

from helpers import V, build
from helpers import tiny as tiny_model_config

torch.set_default_dtype(torch.float32)



def tiny(arch="mor", **kw):
    """Untied embeddings: random models do not just repeat their input."""
    kw.setdefault("tie_word_embeddings", False)
    return tiny_model_config(arch, **kw)


def prompts(lengths=(1, 6, 13), seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


def reference_greedy(model, prompt, n):
    """Greedy decoding by repeated full, uncached forwards with the causal routing rule."""
    ids, logits, depths = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            out = model(torch.tensor([ids]), routing="threshold")
            logits.append(out.logits[0, -1])
            if out.depth is not None:
                depths.append(int(out.depth[0, -1]))
            elif model.config.architecture == "recursive":
                depths.append(model.config.num_recursions)
            else:
                depths.append(0)
            ids.append(int(out.logits[0, -1].argmax()))
    return ids[len(prompt):], torch.stack(logits), depths


ARCHS = [
    ("vanilla", {}),
    ("recursive", {}),
    ("mor", {}),  # expert-choice, linear router
    ("mor", dict(use_aux_router=True)),
    ("mor", dict(router_type="token")),
]
EXTRA = [  # sharing schemes and capacities that exercise the other code paths
    ("mor", dict(sharing="middle_sequence"), "recursion_wise"),
    ("mor", dict(sharing="cycle", num_hidden_layers=9), "shared"),
    ("mor", dict(router_arch="mlp", router_func="tanh"), "recursion_wise"),
    ("mor", dict(num_recursions=4, num_hidden_layers=10, capacities=[0.9, 0.7, 0.5, 0.2]), "recursion_wise"),
    ("mor", dict(router_type="token", gate_every_recursion=True, router_func="softmax"), "shared"),
]
CASES = ([(a, kw, kv) for a, kw in ARCHS for kv in ("recursion_wise", "shared") if a != "vanilla" or kv == "recursion_wise"]
         + EXTRA)


def _id(case):
    a, kw, kv = case
    return "-".join([a, kv] + [f"{k}={v}" for k, v in kw.items()])


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("schedule", ["depth", "sequence"])
def test_cached_greedy_equals_uncached_forward(case, schedule):
    arch, kw, kv = case
    model = build(tiny(arch, kv_mode=kv, **kw))
    check_greedy_against_uncached(model, Engine(model, max_batch=4, schedule=schedule, record_logits=True,
                                                block_size=4))


def check_greedy_against_uncached(model, eng: Engine, n: int = 9) -> None:
    """Greedy decoding of three prompts on ``eng`` (record_logits=True) gives the uncached
    forward's tokens, logits and depths, and returns every KV block."""
    ps = prompts()
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    for p in ps:
        eng.add_request(p, params)
    all_depths = []
    for p, o in zip(ps, eng.run_until_done()):
        toks, logits, depths = reference_greedy(model, p, n)
        assert o.token_ids == toks
        torch.testing.assert_close(o.logits, logits, atol=2e-5, rtol=1e-4)
        assert o.depths == depths
        all_depths += o.depths
    if model.config.architecture == "mor":
        assert len(set(all_depths)) > 1, "routing should vary across tokens for this test to mean something"
    assert eng.stats.kv["kv_used_bytes"] == 0  # every block returned


@pytest.mark.parametrize("ratio", [0.0, 1e9], ids=["split", "merged"])
def test_attention_split_per_depth_or_merged_agree(ratio, monkeypatch):
    """Tokens at different depths attend to different caches: one attention call per cache
    group, or one padded call for the whole batch; both equal the uncached forward. (The
    PyTorch path's plan: the CPU kernels always read each row's own blocks in one call.)"""
    model = build(tiny("mor", num_recursions=4, num_hidden_layers=10, capacities=[1.0, 0.7, 0.5, 0.3]), seed=2)
    eng = Engine(model, max_batch=4, block_size=4, attention_merge_ratio=ratio, record_logits=True,
                 cpu_kernels=False)
    calls = []
    plan = eng.runner._plan_attention
    monkeypatch.setattr(eng.runner, "_plan_attention", lambda *a: calls.append(len(r := plan(*a))) or r)
    ps = prompts((1, 7, 4, 10), seed=6)
    for p in ps:
        eng.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for p, o in zip(ps, eng.run_until_done()):
        toks, logits, depths = reference_greedy(model, p, 8)
        assert o.token_ids == toks and o.depths == depths
        torch.testing.assert_close(o.logits, logits, atol=2e-5, rtol=1e-4)
    assert (max(calls) > 1) == (ratio == 0.0)


def test_prompt_in_one_forward_equals_token_by_token():
    """Prefill (one compacted forward) and decode (one token at a time) give the same logits."""
    model = build(tiny("mor"), seed=4)
    ids = prompts((12,), seed=9)[0]
    eng = Engine(model, max_batch=2, record_logits=True, block_size=4)
    eng.add_request(ids, SamplingParams(max_tokens=1, temperature=0))
    whole = eng.run_until_done()[0].logits[0]
    with torch.no_grad():
        full = model(torch.tensor([ids]), routing="threshold").logits[0, -1]
    torch.testing.assert_close(whole, full, atol=2e-5, rtol=1e-4)


def _mixed_requests():
    ps = prompts((1, 9, 3, 14, 2, 6, 1), seed=11)
    lens = [7, 3, 12, 5, 9, 1, 10]
    return ps, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lens]


@pytest.mark.parametrize("arch,kw", [("mor", {}), ("mor", dict(router_type="token", kv_mode="shared")),
                                     ("vanilla", {}), ("recursive", {})])
@pytest.mark.parametrize("schedule", ["depth", "sequence"])
def test_mixed_batch_equals_each_request_alone(arch, kw, schedule):
    model = build(tiny(arch, **kw), seed=1)
    ps, params = _mixed_requests()
    eng = Engine(model, max_batch=3, schedule=schedule, block_size=4)  # fewer slots than requests
    for p, sp in zip(ps, params):
        eng.add_request(p, sp)
    together = eng.run_until_done()
    for p, sp, o in zip(ps, params, together):
        alone = Engine(model, max_batch=1, schedule=schedule, block_size=4)
        alone.add_request(p, sp)
        a = alone.run_until_done()[0]
        assert o.token_ids == a.token_ids and o.depths == a.depths
        assert len(o.token_ids) == sp.max_tokens and o.finish_reason == "length"
    assert eng.stats.requests_finished == len(ps)
    assert eng.stats.mean_running > 1.5  # the batch really ran several sequences at once


def test_preemption_under_memory_pressure_keeps_results():
    model = build(tiny("mor"), seed=2)
    ps = prompts((1, 2, 1, 3, 1), seed=5)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (30, 25, 28, 20, 30)]
    roomy = Engine(model, max_batch=4, block_size=4)
    tight = Engine(model, max_batch=4, block_size=4, num_blocks=90)  # long outputs outgrow the pool
    for eng in (roomy, tight):
        for p, sp in zip(ps, params):
            eng.add_request(p, sp)
    a, b = roomy.run_until_done(), tight.run_until_done()
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert tight.stats.preemptions > 0 and roomy.stats.preemptions == 0
    assert tight.stats.kv["kv_peak_bytes"] <= tight.stats.kv["kv_pool_bytes"]


def test_depthwise_batch_mixes_depths_and_refills_slots():
    model = build(tiny("mor"), seed=5)
    eng = Engine(model, max_batch=4, schedule="depth", block_size=4)
    for p in prompts((1, 1, 1, 1, 1, 1), seed=2):
        eng.add_request(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    calls, execute = [], eng.runner.execute
    # each shared-block call's recursions (the step runs from Python or as one kernels call)
    eng.runner.execute = lambda plan: (out := execute(plan), calls.extend(set(r.tolist()) for r in out.block_recs))[0]
    eng.run_until_done()
    mixed = sum(len(recs) > 1 for recs in calls)
    assert mixed > 0  # some block calls ran tokens of different depths together
    s = eng.stats
    # exited tokens are replaced at once: the shared block stays nearly full while 4+ requests remain
    assert s.mean_block_batch > 2.5


# ---------------------------------------------------------------------- errors
def test_invalid_sampling_params():
    assert issubclass(RequestError, ValueError)
    for kw, word in [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                     (dict(top_k=-2), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(seed="x"), "seed"),
                     (dict(stop=[""]), "stop"), (dict(temperature=float("nan")), "temperature")]:
        with pytest.raises(RequestError, match=word):
            SamplingParams(**kw)


def test_bad_requests_fail_clearly_and_others_finish():
    model = build(tiny("mor", max_position_embeddings=40), seed=6)
    good = prompts((4, 2), seed=5)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    eng = Engine(model, max_batch=4, block_size=4)
    ids = [eng.add_request(good[0], sp)]
    with pytest.raises(RequestError, match="empty"):
        eng.add_request([], sp)
    with pytest.raises(RequestError, match="longer than the context"):
        eng.add_request([1] * 41, sp)
    with pytest.raises(RequestError, match="more than the cache holds"):
        eng.add_request([1] * 30, SamplingParams(max_tokens=20))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        eng.add_request([1, V + 3], sp)
    with pytest.raises(RequestError, match="tokenizer"):
        eng.add_request("text without a tokenizer", sp)
    bad = SamplingParams(max_tokens=3)
    bad.temperature = -1.0  # mutated after construction: still caught at submission
    with pytest.raises(RequestError, match="temperature"):
        eng.add_request(good[1], bad)
    ids.append(eng.add_request(good[1], sp))
    outs = eng.run_until_done()
    assert eng.stats.requests_rejected == 6 and eng.stats.requests_finished == 2
    for p, o in zip(good, outs):
        alone = Engine(model, max_batch=1)
        alone.add_request(p, sp)
        assert o.token_ids == alone.run_until_done()[0].token_ids


def test_request_larger_than_pool_is_rejected():
    model = build(tiny("mor"))
    eng = Engine(model, max_batch=2, block_size=4, num_blocks=20)
    with pytest.raises(RequestError, match="KV blocks"):
        eng.add_request([1, 2, 3], SamplingParams(max_tokens=30))


def test_llm_generate_reports_errors_per_request(tmp_path):
    model = build(tiny("mor"), seed=7)
    llm = LLM(model, max_batch=4)
    ps = prompts((3, 5), seed=1)
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    outs = llm.generate([ps[0], [], ps[1]], sp)
    assert outs[1].finish_reason == "error" and "empty" in outs[1].error
    assert outs[0].finish_reason == "length" and len(outs[2].token_ids) == 5
    assert outs[0].token_ids == llm.generate(ps[0], sp)[0].token_ids  # single prompt as token ids


# ---------------------------------------------------------------------- stats
def test_stats_expose_occupancy_exits_and_kv_memory():
    model = build(tiny("mor", num_recursions=3), seed=8)
    eng = Engine(model, max_batch=4, block_size=4)
    ps = prompts((1, 5, 9, 2, 4), seed=4)
    for p in ps:
        eng.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    outs = eng.run_until_done()
    s = eng.stats
    assert isinstance(s, EngineStats)
    depths = [d for o in outs for d in o.depths]
    assert s.generated_tokens == len(depths) == 40
    assert s.exit_counts == [depths.count(d) for d in range(4)]
    assert s.recursion_tokens == [sum(d > r for d in depths) for r in range(3)]
    assert s.block_tokens == sum(s.recursion_tokens)
    assert abs(sum(s.occupancy) - 1.0) < 1e-9
    assert s.prompt_tokens == sum(len(p) - 1 for p in ps)
    kv = s.kv
    assert kv["kv_used_bytes"] == 0 < kv["kv_peak_bytes"] <= kv["kv_pool_bytes"]
    g = kv["kv_group_peak_bytes"]
    assert g["rec0"] >= g["rec1"] >= g["rec2"] > 0  # deeper recursions cache fewer tokens
    d = s.as_dict()
    json.dumps(d)
    assert d["tokens_per_s"] > 0 and d["mean_depth"] == pytest.approx(sum(depths) / len(depths))


def test_kv_sharing_uses_less_memory_than_recursion_wise():
    peaks = {}
    for kv in ("recursion_wise", "shared"):
        model = build(tiny("mor", kv_mode=kv), seed=3)
        eng = Engine(model, max_batch=4, block_size=4)
        for p in prompts((1, 8, 3, 6), seed=4):
            eng.add_request(p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        eng.run_until_done()
        peaks[kv] = eng.stats.kv["kv_peak_bytes"]
    assert peaks["shared"] < peaks["recursion_wise"]


# ---------------------------------------------------------------------- sampling
def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]] * 3))
    out = filter_logits(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.6, 0.85]))
    keep = torch.isfinite(out)
    assert keep.tolist() == [[True, True, False, False, False],
                             [True, True, False, False, False],
                             [True, True, True, False, False]]
    assert torch.equal(out[keep], logits[keep])


def test_sampling_follows_the_filtered_distribution():
    probs = torch.tensor([0.05, 0.45, 0.3, 0.0, 0.2])
    logits = probs.log().expand(20000, -1)
    g = torch.Generator().manual_seed(0)
    tok = sample(logits, [SamplingParams(temperature=1.0)] * 20000, [None] * 20000, g)
    freq = torch.bincount(tok, minlength=5).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    # temperature 0.5 squares and renormalises; top_k=2 keeps tokens 1 and 2
    tok = sample(logits, [SamplingParams(temperature=0.5, top_k=2)] * 20000, [None] * 20000, g)
    freq = torch.bincount(tok, minlength=5).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0, 0.45**2, 0.3**2, 0, 0]) / (0.45**2 + 0.3**2), atol=0.015, rtol=0)


def test_sampling_mixes_greedy_and_sampled_rows():
    """The PyTorch path (no kernels): greedy rows take the argmax, and the others draw exactly what
    they draw without the greedy rows (the same uniform numbers, in row order), at their own
    temperatures and filters."""
    logits = torch.randn(7, 40, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=t, top_k=k) for t, k in
              [(0, 0), (1.0, 0), (0.6, 5), (0, 0), (1.7, 0), (1.0, 3), (0, 0)]]
    mixed = sample(logits, params, [None] * 7, torch.Generator().manual_seed(11))
    rows = [1, 2, 4, 5]
    alone = sample(logits[rows], [params[i] for i in rows], [None] * 4, torch.Generator().manual_seed(11))
    assert mixed[rows].tolist() == alone.tolist()
    assert mixed[[0, 3, 6]].tolist() == logits[[0, 3, 6]].argmax(-1).tolist()
    assert sample(logits, [params[0]] * 7, [None] * 7).tolist() == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_batch_independent():
    model = build(tiny("mor"), seed=9)
    p = prompts((4,), seed=6)[0]
    sp = SamplingParams(max_tokens=12, temperature=1.3, top_k=20, top_p=0.9, seed=123, ignore_eos=True)
    alone = Engine(model, max_batch=1)
    alone.add_request(p, sp)
    a = alone.run_until_done()[0].token_ids
    busy = Engine(model, max_batch=4, seed=0)
    for q in prompts((2, 5, 7), seed=8):
        busy.add_request(q, SamplingParams(max_tokens=9, temperature=1.0, ignore_eos=True))
    rid = busy.add_request(p, sp)
    b = busy.run_until_done()[rid].token_ids
    assert a == b
    other = Engine(model, max_batch=1)
    other.add_request(p, SamplingParams(max_tokens=12, temperature=1.3, top_k=20, top_p=0.9, seed=124,
                                        ignore_eos=True))
    assert other.run_until_done()[0].token_ids != a
    # top_k = 1 is greedy
    g1, g2 = Engine(model, max_batch=1), Engine(model, max_batch=1)
    g1.add_request(p, SamplingParams(max_tokens=8, temperature=0.7, top_k=1, seed=5, ignore_eos=True))
    g2.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert g1.run_until_done()[0].token_ids == g2.run_until_done()[0].token_ids


# ---------------------------------------------------------------------- text, streaming, CLI
def char_tokenizer():
    """A character-level tokenizer with <|endoftext|> at id 0 (like the project's tokenizers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = list(string.ascii_letters + string.digits + " .,;:!?'-")
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|endoftext|>"])
    assert tok.get_vocab_size() <= V
    return tok


def test_stop_strings_eos_and_streaming():
    tok = char_tokenizer()
    model = build(tiny("mor"), seed=10)
    free = LLM(model, tok, max_batch=2).generate("To be", SamplingParams(max_tokens=30, temperature=0,
                                                                          ignore_eos=True))[0]
    text = free.text
    assert len(text) >= 6
    stop = text[3:5]  # a stop string that surely occurs
    cut = text.index(stop)
    llm = LLM(model, tok, max_batch=2)
    pieces = []
    outs = llm.generate(["To be", "To be"], [SamplingParams(max_tokens=30, temperature=0, stop=[stop],
                                                            ignore_eos=True),
                                             SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)],
                        on_event=lambda ev: pieces.append(ev.text) if ev.index == 0 else None)
    assert outs[0].text == text[:cut] and outs[0].finish_reason == "stop"
    assert "".join(pieces) == outs[0].text  # streamed deltas add up; nothing of the stop string leaked
    assert outs[1].text == text
    # EOS: make the end-of-text token the greedy choice at once
    with torch.no_grad():
        model.lm_head.weight[0] += 50 * model.model.norm.weight.sign()
    eos = LLM(model, tok).generate("To be", SamplingParams(max_tokens=10, temperature=0))[0]
    assert eos.finish_reason == "stop" and eos.token_ids[-1] == 0 and len(eos.token_ids) < 10


def test_generate_text_on_in_memory_model_restores_mode():
    tok = char_tokenizer()
    model = build(tiny("mor"), seed=11).train()
    texts = generate_text(model, tok, ["Hello", "To be"], SamplingParams(max_tokens=7, temperature=0.8, seed=3))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert model.training
    again = generate_text(model, tok, ["Hello", "To be"], SamplingParams(max_tokens=7, temperature=0.8, seed=3))
    assert again == texts
    # an empty prompt is unprompted generation (the trainer's default sample prompt)
    free = generate_text(model, tok, ["", ""], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    alone = LLM(model, tok).generate([[0]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert free == [alone.text, alone.text]
    with pytest.raises(RequestError, match="must be a string"):
        generate_text(model, tok, [[1, 2]], SamplingParams(max_tokens=3))
    with pytest.raises(RequestError, match="more than the cache holds"):
        generate_text(model, tok, ["x" * 20], SamplingParams(max_tokens=model.config.max_position_embeddings))


def test_llm_from_checkpoint_and_cli(tmp_path, capsys):
    from mor.checkpoint import save_checkpoint
    from mor.cli import main

    tok = char_tokenizer()
    model = build(tiny("mor"), seed=12)
    ck = save_checkpoint(tmp_path / "ck", model, tokenizer=tok)
    llm = mor.LLM(ck)
    out = llm.generate(["Hi"], mor.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    ref = LLM(model, tok).generate(["Hi"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == ref.token_ids and len(out.depths) == 5

    rc = main(["generate", str(ck), "--prompt", "Hi", "--prompt", "To", "-n", "5", "-t", "0", "--ignore-eos"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    summary = json.loads(lines[-1])
    assert summary["status"] == "ok" and summary["outputs"][0]["text"] == ref.text
    assert summary["outputs"][1]["num_tokens"] == 5
    assert any(line.startswith("Hi") for line in lines)  # the human text came first

    rc = main(["generate", str(ck), "--prompt", "", "--prompt", "Hi", "-n", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 2 and json.loads(lines[-1])["status"] == "error" and "empty" in json.loads(lines[-1])["error"]
    rc = main(["generate", str(ck), "--prompt", "Hi", "--top-p", "0"])
    assert rc == 2 and "top_p" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]


@pytest.mark.parametrize("arch", ["vanilla", "mor"])
def test_generate_text_single_prompt_default_pool(arch):
    """The default KV pool must admit what it was sized for (regression: one prompt was refused)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate("abcdefgh")}},
                                     unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    m = MoRForCausalLM(preset("tiny", arch, vocab_size=9, max_position_embeddings=64)).eval()
    for prompt in ("abc", ""):
        out = generate_text(m, tok, [prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        assert len(out) == 1 and isinstance(out[0], str)


def test_abort_frees_slot_and_blocks_and_stops_events():
    """Engine.abort on a running and a waiting request: True once, slot and KV blocks freed at
    once, no further events; the other requests finish exactly as alone."""
    from mor.engine.request import Status
    model = build(tiny("mor"), seed=1)
    eng = Engine(model, max_batch=2, block_size=4)
    ps = prompts((5, 3, 4), seed=8)
    ids = [eng.add_request(p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)) for p in ps]
    for _ in range(3):
        eng.step()
    running = eng.scheduler.requests[ids[0]]
    assert running.status is Status.RUNNING and eng.scheduler.requests[ids[2]].status is Status.WAITING
    slot, used = running.slot, eng.pool.used_blocks
    assert eng.pool.nblocks[:, slot].sum() > 0
    assert eng.abort(ids[0]) and eng.abort(ids[2])
    assert not eng.abort(ids[0]) and not eng.abort(12345)
    assert eng.pool.nblocks[:, slot].sum() == 0 and eng.pool.used_blocks < used
    assert slot not in eng.scheduler.running and running.finish_reason == "abort"
    events = []
    outs = eng.run_until_done(on_event=events.append)
    assert {e.request_id for e in events} == {ids[1]}
    assert [e.depth for e in events] == outs[0].depths[-len(events):]
    assert [o.request_id for o in outs] == [ids[1]]
    toks, _, _ = reference_greedy(model, ps[1], 10)
    assert outs[0].token_ids == toks
    assert eng.stats.kv["kv_used_bytes"] == 0 and not eng.has_unfinished
    late = eng.add_request(ps[2], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert eng.run_until_done()[0].request_id == late  # the freed slot serves new requests
