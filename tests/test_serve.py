"""``mor serve`` (issue 14): a real server on 127.0.0.1 and a free port, talked to over HTTP
with the official ``openai`` client and httpx. Greedy outputs are compared with
``mor.LLM(ckpt).generate`` token for token; errors, metrics, cancellation and shutdown are
checked against what was sent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import mor  # noqa: E402
from mor.engine import Engine, SamplingParams  # noqa: E402
from serve_utils import LiveServer, make_checkpoint  # noqa: E402

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-mor")


@pytest.fixture(scope="module")
def server(ck):
    with LiveServer(ck, max_batch=8) as srv:
        yield srv


@pytest.fixture(scope="module")
def llm(ck):
    return mor.LLM(ck, max_batch=8)


def reference(llm, prompts, params):
    """Token ids and depths of ``mor.LLM.generate`` for each (prompt, params)."""
    outs = llm.generate(prompts, params)
    return [(o.token_ids, o.depths, o.finish_reason) for o in outs]


def extra(obj, key):
    return (obj.model_extra or {}).get(key)


def metric_values(text: str) -> dict:
    """{(name, frozenset(labels)): value} of a Prometheus exposition (prometheus-client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset((k, v) for k, v in s.labels.items() if k != "model_name"))] = s.value
    return out


def wait_idle(srv, timeout=20.0):
    """Until the engine has nothing to do and the KV pool is empty."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = srv.state
        if st.thread.inflight == 0 and not st.engine.has_unfinished and st.engine.pool.used_blocks == 0:
            return
        time.sleep(0.02)
    raise AssertionError("the server did not become idle (a request was lost or KV blocks leaked)")


# ---------------------------------------------------------------------- engine abort
def test_engine_abort_frees_slot_and_blocks_and_leaves_others_unchanged(ck):
    llm = mor.LLM(ck, max_batch=2)
    ps = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    sp = SamplingParams(max_tokens=12, **GREEDY)
    alone = reference(llm, [ps[0], ps[2]], sp)
    eng = Engine(llm.model, llm.tokenizer, max_batch=2, block_size=4)
    a, b, c = (eng.add_request(p, sp) for p in ps)
    for _ in range(3):
        eng.step()
    assert eng.abort(c)  # waiting (two slots, c is third)
    assert eng.abort(b)  # running
    assert not eng.abort(b) and not eng.abort(12345)
    outs = eng.run_until_done()
    assert [o.request_id for o in outs] == [a]
    assert (outs[0].token_ids, outs[0].depths) == alone[0][:2]
    assert eng.pool.used_blocks == 0 and not eng.has_unfinished
    assert not eng.abort(a)  # finished
    # the freed slot serves a new request correctly
    d = eng.add_request(ps[2], sp)
    assert eng.run_until_done()[0].token_ids == alone[1][0] and d > c


# ---------------------------------------------------------------------- the openai client
def test_openai_client_completions_and_chat_equal_llm(server, llm, ck):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    name = server.state.name
    assert [m.id for m in client.models.list().data] == [name]
    prompts = ["the quick brown", "a lazy dog while"]
    ref = reference(llm, prompts, SamplingParams(max_tokens=9, **GREEDY))
    body = {"ignore_eos": True, "return_token_ids": True}
    r = client.completions.create(model=name, prompt=prompts, max_tokens=9, temperature=0, extra_body=body)
    assert [c.index for c in r.choices] == [0, 1]
    for c, (toks, depths, _) in zip(r.choices, ref):
        assert extra(c, "token_ids") == toks and extra(c, "mor_depths") == depths
        assert c.text == llm.tokenizer.decode(toks) and c.finish_reason == "length"
    assert r.usage.completion_tokens == 18 and r.usage.prompt_tokens == sum(
        len(llm.tokenizer.encode(p).ids) for p in prompts)
    # streamed: the pieces add up, usage in the last chunk
    chunks = list(client.completions.create(model=name, prompt=prompts[1], max_tokens=9, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=body))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    toks = [t for ch in chunks[:-1] for t in extra(ch.choices[0], "token_ids")]
    assert toks == ref[1][0]
    assert "".join(ch.choices[0].text for ch in chunks[:-1]) == llm.tokenizer.decode(ref[1][0])
    assert extra(chunks[-2].choices[0], "mor_depths") == ref[1][1] and chunks[-2].choices[0].finish_reason == "length"
    # token-id prompts give the same as their text
    r2 = client.completions.create(model=name, prompt=llm.tokenizer.encode(prompts[0]).ids, max_tokens=9,
                                   temperature=0, extra_body=body)
    assert extra(r2.choices[0], "token_ids") == ref[0][0]

    # chat: the template of tokenizer_config.json, rendered and encoded without special-token additions
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"}]
    rendered = ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nthe fox<|im_end|>\n"
                "<|im_start|>assistant\n")
    ids = llm.tokenizer.encode(rendered, add_special_tokens=False).ids
    assert llm.tokenizer.token_to_id("<|im_start|>") in ids
    (ctoks, cdepths, _), = reference(llm, [ids], SamplingParams(max_tokens=7, **GREEDY))
    r = client.chat.completions.create(model=name, messages=msgs, max_tokens=7, temperature=0, extra_body=body)
    assert extra(r.choices[0], "token_ids") == ctoks and extra(r.choices[0], "mor_depths") == cdepths
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == llm.tokenizer.decode(ctoks) and r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=name, messages=msgs, max_completion_tokens=7, temperature=0,
                                                 stream=True, extra_body=body))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [t for ch in chunks[1:] for t in extra(ch.choices[0], "token_ids")] == ctoks
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    tok = httpx.post(server.url + "/tokenize", json={"messages": msgs}).json()
    assert tok["tokens"] == ids and tok["count"] == len(ids)
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == rendered


def test_logprobs_seeds_n_echo_stop(server, llm):
    name = server.state.name
    tok = llm.tokenizer
    prompt = "seven wizards"
    pids = tok.encode(prompt).ids
    r = httpx.post(server.url + "/v1/completions", json={
        "model": name, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 3,
        "echo": True, "return_token_ids": True}).json()
    c = r["choices"][0]
    toks = c["token_ids"]
    assert c["text"] == prompt + tok.decode(toks)
    # logprobs against an uncached forward of the model (the engine's logits are checked elsewhere)
    with torch.no_grad():
        logits = llm.model(torch.tensor([pids + toks]), routing="threshold").logits[0, len(pids) - 1:-1]
    lp = torch.log_softmax(logits.float(), -1)
    want = [float(lp[i, t]) for i, t in enumerate(toks)]
    assert c["logprobs"]["token_logprobs"] == pytest.approx(want, abs=1e-4)
    top = c["logprobs"]["top_logprobs"][0]
    assert len(top) <= 3 and max(top.values()) == pytest.approx(float(lp[0].max()), abs=1e-4)
    assert c["logprobs"]["text_offset"][0] == len(prompt)
    # seeded sampling: the same seed gives the same tokens; n choices use seed + index
    body = {"model": name, "prompt": prompt, "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 2,
            "ignore_eos": True, "return_token_ids": True}
    a = httpx.post(server.url + "/v1/completions", json=body).json()
    b = httpx.post(server.url + "/v1/completions", json=body).json()
    assert [c["token_ids"] for c in a["choices"]] == [c["token_ids"] for c in b["choices"]]
    ref = llm.generate([prompt, prompt], SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True))
    assert [c["token_ids"] for c in a["choices"]] == [o.token_ids for o in ref]
    # streamed n=2 with echo: per choice, the prompt first, then pieces adding up to the same text
    texts = {0: "", 1: ""}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "echo": True, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] += c["text"]
    assert texts == {c["index"]: prompt + c["text"] for c in a["choices"]}
    # stop strings and stop tokens
    free = llm.generate(prompt, SamplingParams(max_tokens=12, **GREEDY))[0]
    stop_tok = free.token_ids[3]
    r = httpx.post(server.url + "/v1/completions", json={
        "model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
        "stop_token_ids": [stop_tok], "return_token_ids": True}).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["token_ids"] == free.token_ids[:free.token_ids.index(stop_tok) + 1]


async def _many(url, jobs, stream_every=2):
    """(token ids, token logprobs) of greedy completions by the async ``openai`` client, all
    at once, every other one streamed."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    async def one(i, prompt, n):
        kw = dict(model="tiny-mor", prompt=prompt, max_tokens=n, temperature=0, logprobs=0,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
        if i % stream_every:
            toks, lps = [], []
            async for ch in await client.completions.create(stream=True, **kw):
                toks += extra(ch.choices[0], "token_ids")
                lps += ch.choices[0].logprobs.token_logprobs
            return toks, lps
        r = await client.completions.create(**kw)
        return extra(r.choices[0], "token_ids"), r.choices[0].logprobs.token_logprobs

    try:
        return await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(jobs)))
    finally:
        await client.close()


async def _stream_tokens(cl, body, stop_after=None):
    """Token ids of a streamed completion; closes the connection after ``stop_after`` tokens."""
    toks, done = [], False
    async with cl.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            toks += json.loads(line[6:])["choices"][0]["token_ids"]
            if stop_after is not None and len(toks) >= stop_after:
                return toks, False
    return toks, done


def _concurrent_jobs(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, 290, (int(a),), generator=g).tolist(), int(b))
            for a, b in zip(torch.randint(1, 30, (n,), generator=g), torch.randint(1, 20, (n,), generator=g))]


def _check_concurrent(url, llm, jobs, schedule="auto"):
    """Served greedy tokens equal mor.LLM's; served logprobs equal the engine's own logits."""
    got = asyncio.run(_many(url, jobs))
    ref = reference(llm, [p for p, _ in jobs], [SamplingParams(max_tokens=m, **GREEDY) for _, m in jobs])
    # per-token logprobs: the engine's own logits of each sampled token (record_logits)
    eng = Engine(llm.model, llm.tokenizer, max_batch=8, record_logits=True, schedule=schedule)
    for p, m in jobs:
        eng.add_request(p, SamplingParams(max_tokens=m, **GREEDY))
    logits = [o.logits for o in eng.run_until_done()]
    for i, ((toks, lps), (want, _, _), lg) in enumerate(zip(got, ref, logits)):
        assert toks == want, f"request {i}"
        lp = torch.log_softmax(lg.float(), -1)[torch.arange(len(want)), torch.tensor(want)]
        assert lps == pytest.approx(lp.tolist(), abs=1e-5), f"request {i}"


def test_32_concurrent_requests_equal_llm_with_logprobs(server, llm):
    _check_concurrent(server.url, llm, _concurrent_jobs(32))
    wait_idle(server)


def test_concurrent_logprobs_with_sequence_wise_batching(ck, llm):
    """The LM-head rows of a step follow its tokens also when tokens leave the recursions in
    several rounds of one step (sequence-wise schedule)."""
    with LiveServer(ck, max_batch=8, schedule="sequence") as srv:
        _check_concurrent(srv.url, llm, _concurrent_jobs(12, seed=4), schedule="sequence")


# ---------------------------------------------------------------------- errors
BAD = [
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_k": -3}, 400, "top_k"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "3"}, 400, "max_tokens"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ({"prompt": "x", "seed": "s"}, 400, "seed"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, "a"]}, 400, "prompt"),
    ({"prompt": [99999]}, 400, "prompt"),
    ({"prompt": [5] * 200}, 400, "prompt"),  # longer than the context (128)
    ({"prompt": [5] * 100, "max_tokens": 100}, 400, "max_tokens"),
    ({}, 400, "prompt"),
    ({"prompt": "x", "model": "no-such-model"}, 404, "model"),
]


def test_bad_inputs_get_status_and_error_body_and_running_requests_are_unchanged(server, llm):
    good = [([7, 8, 9, 10], 24), ([11, 12], 30), ([13], 20)]
    ref = reference(llm, [p for p, _ in good], [SamplingParams(max_tokens=m, **GREEDY) for _, m in good])

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as cl:
            goods = [asyncio.ensure_future(_stream_tokens(cl, {"prompt": p, "max_tokens": m, "temperature": 0,
                                                               "ignore_eos": True, "return_token_ids": True}))
                     for p, m in good]
            await asyncio.sleep(0.05)
            results = []
            for body, status, param in BAD:
                results.append((await cl.post("/v1/completions", json=body), status, param))
            results.append((await cl.post("/v1/completions", content=b"{not json",
                                          headers={"content-type": "application/json"}), 400, None))
            results.append((await cl.post("/v1/completions", json=[1, 2]), 400, None))
            results.append((await cl.post("/v1/chat/completions", json={"messages": []}), 400, "messages"))
            results.append((await cl.post("/v1/chat/completions", json={"messages": [{"role": "user"}],
                                                                        "top_logprobs": 2}), 400, "top_logprobs"))
            results.append((await cl.post("/v1/chat/completions", json={"messages": "hi"}), 400, "messages"))
            results.append((await cl.post("/detokenize", json={"tokens": [10**6]}), 400, "tokens"))
            results.append((await cl.get("/v1/nothing"), 404, None))
            return results, await asyncio.gather(*goods)

    results, goods = asyncio.run(main())
    for r, status, param in results:
        assert r.status_code == status, (r.request.content[:80], r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["param"] == param, (param, err)
    ctx = [r for r, _, p in results if r.json()["error"]["code"] == "context_length_exceeded"]
    assert len(ctx) == 2 and "128" in ctx[0].json()["error"]["message"]
    for (toks, done), (want, _, _) in zip(goods, ref):
        assert done and toks == want
    wait_idle(server)


GARBAGE = [None, -1, 0, 2**70, -2**70, 1e300, 1e-300, "x", "", [], {}, [1, "a"], [[]], True, [2**70]]
PARAMS = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "stop_token_ids", "seed",
          "logprobs", "echo", "stream", "ignore_eos", "stream_options", "model", "best_of", "suffix"]


def test_no_500_for_any_garbage_value(server):
    """Every parameter with every odd value: an answer (200 or a 4xx), never a 500, and the
    engine keeps running."""
    statuses = set()
    with httpx.Client(base_url=server.url, timeout=60) as cl:
        for p in PARAMS:
            for v in GARBAGE:
                body = {"prompt": [5, 6], "max_tokens": 2, p: v}
                r = cl.post("/v1/completions", json=body)
                statuses.add(r.status_code)
                assert r.status_code in (200, 400, 404), (p, v, r.text)
                if r.status_code != 200:
                    assert r.json()["error"]["message"]
            for v in GARBAGE:
                r = cl.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 2, p if p != "prompt" else "messages": v})
                assert r.status_code in (200, 400, 404), (p, v, r.text)
        assert cl.get("/health").status_code == 200
    assert {200, 400} <= statuses
    wait_idle(server)


def test_chat_without_template_is_a_clear_400(tmp_path):
    ck = make_checkpoint(tmp_path / "plain", arch="vanilla", chat_template=None)
    with LiveServer(ck) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "messages"
        # completions still work on the same server (sequence-wise batching for vanilla)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "the", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["mor"]["schedule"] == "sequence"


def test_api_key(ck):
    with LiveServer(ck, api_key="sesame") as srv:
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        r = httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(srv.url + "/tokenize", json={"prompt": "a"}).status_code == 401
        assert httpx.post(srv.url + "/v1/completions", json={"temperature": -1}).status_code == 401  # key first
        assert httpx.get(srv.url + "/health").status_code == 200  # health and metrics stay open
        assert httpx.get(srv.url + "/metrics").status_code == 200
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="sesame")
        assert c.completions.create(model=srv.state.name, prompt="the", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope").models.list()


def test_disconnect_cancels_and_full_queue_is_503(tmp_path):
    ck = make_checkpoint(tmp_path / "long", max_position_embeddings=2048)
    with LiveServer(ck, max_batch=1, max_queue=0) as srv:
        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as cl:
                body = {"prompt": [5, 6], "max_tokens": 2000, "ignore_eos": True, "return_token_ids": True}
                async with cl.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    lines = r.aiter_lines()
                    while not (await lines.__anext__()).startswith("data: "):
                        pass
                    full = await cl.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
                    assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
                    assert full.headers.get("retry-after") == "1"
                    assert srv.state.engine.pool.used_blocks > 0
                # the stream is closed: the request is cancelled at the next step
        asyncio.run(main())
        wait_idle(srv)
        m = metric_values(httpx.get(srv.url + "/metrics").text)
        assert m[("mor:request_success_total", frozenset({("finished_reason", "abort")}))] == 1
        assert m[("mor:generation_tokens_total", frozenset())] < 2000
        assert srv.state.engine.stats.generated_tokens < 2000  # the engine stopped it, not just the server
        assert m[("mor:kv_cache_usage_perc", frozenset())] == 0
        assert m[("mor:request_errors_total", frozenset({("status", "503")}))] == 1
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        # a client that gives up on a non-streamed answer is cancelled too
        before = srv.state.engine.stats.generated_tokens
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json={"prompt": [5], "max_tokens": 2000, "ignore_eos": True},
                       timeout=0.5)
        wait_idle(srv)
        m = metric_values(httpx.get(srv.url + "/metrics").text)
        assert m[("mor:request_success_total", frozenset({("finished_reason", "abort")}))] == 2
        assert srv.state.engine.stats.generated_tokens - before < 2000


def test_metrics_parse_and_match_what_was_served(ck):
    with LiveServer(ck, max_batch=4) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
        served_prompt = served_gen = choices = 0
        for n, stream, mt in ((1, False, 5), (2, False, 7), (1, True, 4), (3, True, 6)):
            kw = dict(model=srv.state.name, prompt="the lazy dog", max_tokens=mt, n=n, temperature=0.5, seed=1,
                      extra_body={"ignore_eos": True})
            if stream:
                chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
                usage = chunks[-1].usage
            else:
                usage = c.completions.create(**kw).usage
            served_prompt += usage.prompt_tokens * n  # a prompt counts once per choice in the engine
            served_gen += usage.completion_tokens
            choices += n
            assert usage.completion_tokens == n * mt
        httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "top_p": 2})
        wait_idle(srv)
        m = metric_values(httpx.get(srv.url + "/metrics").text)
        F = frozenset()
        assert m[("mor:prompt_tokens_total", F)] == served_prompt
        assert m[("mor:generation_tokens_total", F)] == served_gen
        assert m[("mor:request_success_total", frozenset({("finished_reason", "length")}))] == choices
        assert m[("mor:time_to_first_token_seconds_count", F)] == choices
        assert m[("mor:e2e_request_latency_seconds_count", F)] == choices
        assert m[("mor:inter_token_latency_seconds_count", F)] == served_gen - choices
        assert m[("mor:request_generation_tokens_sum", F)] == served_gen
        assert m[("mor:request_errors_total", frozenset({("status", "400")}))] == 1
        assert m[("mor:num_requests_running", F)] == 0 and m[("mor:num_requests_waiting", F)] == 0
        assert m[("mor:kv_cache_usage_perc", F)] == 0
        stats = srv.state.engine.stats
        nr = stats.num_recursions
        by_depth = [m[("mor:generation_tokens_by_depth_total", frozenset({("depth", str(d))}))] for d in range(nr + 1)]
        assert by_depth == stats.exit_counts and sum(by_depth) == served_gen
        assert m[("mor:mean_recursion_depth", F)] == pytest.approx(
            sum(d * k for d, k in enumerate(by_depth)) / served_gen)
        occ = [m[("mor:recursion_occupancy", frozenset({("recursion", str(r + 1))}))] for r in range(nr)]
        assert sum(occ) == pytest.approx(1.0) and occ[0] >= occ[-1]
        groups = {dict(k[1])["group"] for k in m if k[0] == "mor:kv_cache_bytes"}
        assert groups == {"full"} | {f"rec{r}" for r in range(nr)}
        assert m[("mor:kv_cache_pool_bytes", F)] == stats.kv["kv_pool_bytes"] > 0


# ---------------------------------------------------------------------- shutdown
def test_sigterm_finishes_running_requests_cancels_after_grace_and_exits_0(tmp_path):
    ck = make_checkpoint(tmp_path / "long", max_position_embeddings=4096)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-m", "mor", "serve", str(ck), "--port", "0", "--max-batch", "4",
                             "--shutdown-grace", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = ""
        t0 = time.time()
        while "http://" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
            assert time.time() - t0 < 120
        url = line.split()[line.split().index("on") + 1]
        results = {}

        def run(key, body):
            try:
                results[key] = asyncio.run(_async_stream(url, body))
            except Exception as e:  # noqa: BLE001
                results[key] = e

        short = {"prompt": [5, 6], "max_tokens": 150, "ignore_eos": True, "return_token_ids": True}
        long = {"prompt": [7, 8], "max_tokens": 4000, "ignore_eos": True, "return_token_ids": True}
        threads = [threading.Thread(target=run, args=(k, b)) for k, b in (("short", short), ("long", long))]
        for t in threads:
            t.start()
        t0 = time.time()
        while 'mor:num_requests_running{model_name="long"} 2.0' not in httpx.get(url + "/metrics").text:
            assert time.time() - t0 < 60 and "short" not in results, "both requests should be running"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert threads[1].is_alive()  # the long request still runs during the grace period...
        with pytest.raises(httpx.ConnectError):  # ...but no new connection is accepted
            httpx.get(url + "/health")
        for t in threads:
            t.join(60)
        assert proc.wait(60) == 0
        out = proc.stdout.read().strip().splitlines()
        assert json.loads(out[-1])["status"] == "ok"
        toks, done = results["short"]
        assert done and len(toks) == 150  # finished during the grace period
        long_res = results["long"]
        assert isinstance(long_res, Exception) or (not long_res[1] and len(long_res[0]) < 4000)  # cancelled
    finally:
        if proc.poll() is None:
            proc.kill()


async def _async_stream(url, body):
    async with httpx.AsyncClient(base_url=url, timeout=60) as cl:
        return await _stream_tokens(cl, body)


# ---------------------------------------------------------------------- load
@pytest.mark.parametrize("n_req,clients", [(60, 24), pytest.param(200, 64, marks=pytest.mark.slow)])
def test_load_requests_from_concurrent_clients_preemption_and_disconnects(tmp_path, n_req, clients):
    """200 requests from 64 concurrent clients (60 from 24 in the default suite, the full
    size under -m slow, ~30 s on 2 busy cores), mixed lengths, a KV pool that forces
    preemption, every 5th streamed client hanging up after 3 tokens: the others complete
    with the right tokens (= mor.LLM), nothing is lost or duplicated, the pool ends empty
    and /health answers throughout."""
    ck = make_checkpoint(tmp_path / "load", max_position_embeddings=256, seed=3)
    g = torch.Generator().manual_seed(5)
    plen = torch.randint(1, 16, (n_req,), generator=g).tolist()
    mlen = torch.randint(1, 64, (n_req,), generator=g).tolist()
    jobs = [(torch.randint(3, 290, (p,), generator=g).tolist(), m) for p, m in zip(plen, mlen)]
    cancel = {i for i in range(n_req) if i % 5 == 1 and mlen[i] >= 20}
    block = 2 * 4 * 2 * 16 * 4  # K+V bytes of one 4-token block of the tiny preset (fp32)
    with LiveServer(ck, max_batch=16, block_size=4, kv_memory_gb=200 * block / 2**30, max_queue=256) as srv:
        health: list[tuple[int, float]] = []
        stop = threading.Event()

        def poll():
            with httpx.Client(base_url=srv.url, timeout=10) as cl:
                while not stop.is_set():
                    t = time.perf_counter()
                    health.append((cl.get("/health").status_code, time.perf_counter() - t))
                    time.sleep(0.05)

        poller = threading.Thread(target=poll)
        poller.start()

        async def main():
            sem = asyncio.Semaphore(clients)
            async with httpx.AsyncClient(base_url=srv.url, timeout=120,
                                         limits=httpx.Limits(max_connections=clients)) as cl:
                async def one(i):
                    p, m = jobs[i]
                    body = {"prompt": p, "max_tokens": m, "temperature": 0, "ignore_eos": True,
                            "return_token_ids": True}
                    async with sem:
                        if i % 5 == 1:
                            return await _stream_tokens(cl, body, stop_after=3 if i in cancel else None)
                        r = await cl.post("/v1/completions", json=body)
                        assert r.status_code == 200, r.text
                        c = r.json()
                        return c["choices"][0]["token_ids"], c["id"]

                return await asyncio.gather(*(one(i) for i in range(n_req)))

        try:
            got = asyncio.run(main())
            wait_idle(srv, timeout=60)
        finally:
            stop.set()
            poller.join()
        st = srv.state
        print(f"preemptions: {st.engine.stats.preemptions}, health checks: {len(health)}, slowest "
              f"{max(t for _, t in health):.3f} s")
        assert st.engine.stats.preemptions > 0, "the KV pool should have been small enough to preempt"
        assert st.engine.pool.used_blocks == 0 and not st.engine.has_unfinished
        assert health and all(code == 200 for code, _ in health)
        ids = [x[1] for i, x in enumerate(got) if i % 5 != 1]
        assert len(set(ids)) == len(ids)  # no duplicated answers
        keep = [i for i in range(n_req) if i not in cancel]
        ref = reference(mor.LLM(ck, max_batch=16), [jobs[i][0] for i in keep],
                        [SamplingParams(max_tokens=jobs[i][1], **GREEDY) for i in keep])
        for i, (want, _, _) in zip(keep, ref):
            toks = got[i][0]
            assert len(toks) == jobs[i][1] and toks == want, f"request {i}"
            if i % 5 == 1:
                assert got[i][1] is True  # the stream ended with [DONE]
        m = metric_values(httpx.get(srv.url + "/metrics").text)
        done = m[("mor:request_success_total", frozenset({("finished_reason", "length")}))]
        aborted = m[("mor:request_success_total", frozenset({("finished_reason", "abort")}))]
        assert done + aborted == n_req and 1 <= aborted <= len(cancel)
        assert st.engine.stats.requests_finished == done
        assert m[("mor:num_preemptions_total", frozenset())] == st.engine.stats.preemptions


# ---------------------------------------------------------------------- mor bench serve
def test_bench_serve_against_a_running_server(server, capsys):
    from mor.bench.serve import summarize, workload
    from mor.cli import main

    jobs = workload(6, 5, 7, 0.5, 320, seed=0)
    assert [len(p) for p, _ in jobs] != [5] * 6 and all(3 <= n <= 11 for _, n in jobs)
    assert all(0 < t < 320 for p, _ in jobs for t in p)
    rc = main(["bench", "serve", "--url", server.url, "--concurrency", "1", "3", "--request-rate", "50",
               "--num-requests", "6", "--prompt-len", "5", "--output-len", "7", "--warmup", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    s = json.loads(out[-1])
    assert s["status"] == "ok" and "TTFT" in "\n".join(out[:-1])
    (t,) = s["targets"]
    assert t["architecture"] == "mor" and 1 <= t["mean_depth"] <= 3
    assert [p["load"] for p in t["points"]] == ["c=1", "c=3", "rate=50/s"]
    for p in t["points"]:
        assert p["completed"] == 6 and p["failed"] == 0
        assert p["output_tokens"] == sum(n for _, n in jobs)  # ignore_eos: every drawn length is produced
        assert p["ttft_ms"]["p50"] <= p["ttft_ms"]["p99"] and p["e2e_ms"]["mean"] >= p["ttft_ms"]["mean"]
    # the summary of hand-made results
    r = summarize([{"ttft": 0.1, "e2e": 0.5, "itl": [0.2, 0.2], "tokens": 3}, {"error": "HTTP 503: full"}], 2.0)
    assert r["completed"] == 1 and r["failed"] == 1 and r["errors"] == ["HTTP 503: full"]
    assert r["tpot_ms"]["mean"] == pytest.approx(200.0) and r["output_tokens_per_s"] == 1.5
    wait_idle(server)


@pytest.mark.slow
def test_bench_serve_random_pair_serves_both_checkpoints(tmp_path, capsys):
    """The checkpoint path: a random vanilla + MoR pair of one shape, each served by a child
    process, the same workload, and the MoR / vanilla ratios."""
    from mor.cli import main

    rc = main(["bench", "serve", "--random-pair", str(tmp_path / "pair"), "--preset", "tiny", "--layers", "8",
               "--max-position", "128", "--concurrency", "2", "--num-requests", "4", "--prompt-len", "4",
               "--output-len", "6", "--warmup", "1", "--max-batch", "4"])
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and [t["architecture"] for t in s["targets"]] == ["vanilla", "mor"]
    assert all(t["points"][0]["completed"] == 4 for t in s["targets"])
    v, m = (t["points"][0]["output_tokens"] for t in s["targets"])
    assert v == m  # the same workload
    (r,) = s["ratios"]
    assert r["load"] == "c=2" and r["tokens_per_s_ratio"] > 0
