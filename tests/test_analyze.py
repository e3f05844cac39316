"""`mor analyze` and the depth-capping forward: exactness against the model, depth caps and
extra passes, the depth map's colors against the model's own routing, histograms, scaling."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch.nn import functional

from mor import checkpoint as ckpt
from mor.config import preset
from mor.eval.analyze import depth_colors
from mor.eval.depth import forward_depth
from mor.model import MoRForCausalLM
from reference import reference_forward
from helpers import WORDS, build, run_cli



CONFIGS = {
    "expert": dict(),
    "expert_kv_shared": dict(kv_mode="shared"),
    "expert_aux_router": dict(use_aux_router=True),
    "expert_mlp_nr2": dict(num_recursions=2, router_arch="mlp"),
    "token_softmax": dict(router_type="token", router_func="softmax"),
    "token_sigmoid_gate_all": dict(router_type="token", router_func="sigmoid", gate_every_recursion=True),
    "recursive": dict(architecture="recursive"),
    "vanilla": dict(architecture="vanilla", num_recursions=1),
}


def tiny_model(**kw) -> MoRForCausalLM:
    kw = dict(kw)
    arch, nr = kw.pop("architecture", "mor"), kw.pop("num_recursions", 3)
    return build(preset("tiny", arch, nr, max_position_embeddings=64, **kw))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_depth_matches_the_slow_reference(name):
    """At the trained depth, forward_depth's logits, depths and recorded selections are those of
    the slow reference forward (tests/reference.py), which shares no code path with the model."""
    m = tiny_model(**CONFIGS[name])
    x = torch.randint(0, m.config.vocab_size, (3, 41), generator=torch.Generator().manual_seed(1))
    for routing in ("topk", "threshold"):
        out = forward_depth(m, x, routing=routing, record=True)
        with torch.no_grad():
            ref_logits, ref_depth = reference_forward(m, x, routing=routing)
        torch.testing.assert_close(out.logits, ref_logits, atol=2e-5, rtol=1e-4)
        if m.config.architecture == "mor":
            assert torch.equal(out.depth, ref_depth), (name, routing)
        if name.startswith("expert"):
            # recorded selections: the positions whose reference depth reaches recursion r
            for r, rec in enumerate(out.records):
                chosen = rec.positions[rec.selected & rec.valid]
                assert int((ref_depth >= r + 1).sum()) == chosen.numel()


def test_depth_caps_and_extra_passes():
    m = tiny_model()
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2))
    nr = 3
    for routing in ("topk", "threshold"):
        full = forward_depth(m, x, routing=routing)
        for d in (1, 2):
            capped = forward_depth(m, x, routing=routing, max_depth=d)
            assert torch.equal(capped.depth, full.depth.clamp(max=d))
            assert not torch.equal(capped.logits, full.logits)
        extra = forward_depth(m, x, routing=routing, max_depth=nr + 2)
        reached = full.depth == nr
        assert reached.any()
        assert torch.equal(extra.depth[reached], torch.full_like(extra.depth[reached], nr + 2))
        assert torch.equal(extra.depth[~reached], full.depth[~reached])
        assert not torch.equal(extra.logits, full.logits)
    # a recursive model past N_r applies its last recursion's block again
    rec = tiny_model(architecture="recursive")
    h = forward_depth(rec, x, max_depth=4)
    assert torch.equal(h.depth, torch.full_like(h.depth, 4))
    with pytest.raises(ValueError, match="token-choice"):
        forward_depth(tiny_model(router_type="token"), x, max_depth=4)
    with pytest.raises(ValueError, match="vanilla"):
        forward_depth(tiny_model(architecture="vanilla", num_recursions=1), x, max_depth=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A tiny MoR trained for a few dozen steps on the random corpus, so that its routers make
    learned decisions."""
    from mor.train import TrainConfig, train

    d = tmp_path_factory.mktemp("analyze")
    cfg = TrainConfig(model=dict(preset="tiny", architecture="mor", num_recursions=3, max_position_embeddings=64),
                      data=data_dir, out_dir=str(d / "run"), seq_len=64, batch_size=8, max_steps=40,
                      lr=1e-2, eval_every=0, log_every=100, tensorboard=False, progress=False)
    train(cfg)
    return ckpt.latest_checkpoint(d / "run")


def spans(html: str, mode: str) -> list[tuple[int, int, str]]:
    """(position, depth, background color) of every token span in a mode's section."""
    sec = html.split(f"<section class='mode' data-mode='{mode}'>")[1].split("</section>")[0]
    return [(int(p), int(d), c) for p, d, c in
            re.findall(r"<span class='tok' data-pos='(\d+)' data-depth='(\d+)'[^>]*background:(#[0-9a-f]{6})", sec)]


def test_depth_map_shows_the_routers_decisions(trained, tmp_path, capsys):
    text = ("the quick brown fox jumps over a lazy dog . seven wizards quietly hum while the dog "
            "jumps over the brown fox . Question yes no Answer the lazy wizards hum quietly .") * 2
    out = tmp_path / "out"
    rc, res, printed = run_cli(["analyze", str(trained), "--text", text, "--out", str(out), "--seq-len", "64"],
                               capsys)
    assert rc == 0, printed
    model, tok = ckpt.load_model(trained), ckpt.load_tokenizer(trained)
    ids = tok.encode(text).ids
    assert len(ids) > 64  # more than one chunk
    html = (out / "depth.html").read_text()
    colors = depth_colors(3)
    for mode in ("topk", "threshold"):
        # the model's own routing on each 64-token chunk
        depth = torch.cat([model(torch.tensor([ids[i:i + 64]]), routing=mode).depth[0]
                           for i in range(0, len(ids), 64)]).tolist()
        got = spans(html, mode)
        assert [p for p, _, _ in got] == list(range(len(ids)))
        assert [d for _, d, _ in got] == depth
        assert all(c == colors[d] for _, d, c in got)
        assert len(set(depth)) >= 2  # the map is not uniform: real, varying decisions
        deep, shallow = depth.index(max(depth)), depth.index(min(depth))  # two tokens of different depth
        assert got[deep][2] == colors[max(depth)] != got[shallow][2] == colors[min(depth)]
        a = json.loads((out / "analysis.json").read_text())["modes"][mode]
        assert a["depth"] == depth
        assert a["depth_histogram"] == [depth.count(k) for k in range(4)]
        # router histograms: recursion r's selected candidates are the tokens with depth >= r
        for r in (1, 2, 3):
            h = a["router_histograms"][str(r)]
            candidates = len(depth) if r == 1 else sum(k >= r - 1 for k in depth)
            assert sum(h["selected"]) == sum(k >= r for k in depth)
            assert sum(h["selected"]) + sum(h["unselected"]) == candidates
    # the legend lists every depth with its color
    assert f"background:{colors[3]}" in html and "depth 3:" in html
    for f in ("depth_topk.png", "depth_threshold.png", "depth_histogram.png", "router_histograms_topk.png",
              "router_histograms_threshold.png", "depth_scaling.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f
    saved = json.loads((Path(trained) / "results.json").read_text())
    assert saved["analysis"]["modes"]["topk"]["depth_histogram"] == res["modes"]["topk"]["depth_histogram"]


def test_depth_scaling_numbers(trained, tmp_path, capsys):
    text = " ".join(WORDS[:12])
    rc, res, _ = run_cli(["analyze", str(trained), "--text", text, "--out", str(tmp_path), "--routing", "threshold",
                          "--extra-depth", "1", "--no-save"], capsys)
    assert rc == 0
    pts = res["modes"]["threshold"]["depth_scaling"]
    assert [p["max_depth"] for p in pts] == [1, 2, 3, 4]
    model, tok = ckpt.load_model(trained), ckpt.load_tokenizer(trained)
    x = torch.tensor([tok.encode(text).ids])
    assert x.size(1) <= 64
    with torch.no_grad():
        lg = model(x, routing="threshold").logits[0, :-1]
    nll = functional.cross_entropy(lg, x[0, 1:]).item()
    assert pts[2]["nll"] == pytest.approx(nll, abs=1e-5)  # at the trained depth: the model's NLL
    assert len({round(p["nll"], 6) for p in pts}) == 4  # capping / extending changes the prediction
    assert list(res["modes"]) == ["threshold"]


def test_analyze_errors(trained, tmp_path, capsys):
    rc, res, _ = run_cli(["analyze", str(trained), "--file", str(tmp_path / "none.txt")], capsys)
    assert rc == 2 and "not found" in res["error"]
    rc, res, _ = run_cli(["analyze", str(trained), "--text", "a"], capsys)
    assert rc == 2 and "fewer than 2 tokens" in res["error"]
