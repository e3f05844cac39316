"""``mor export``: transformers loads the export without mor installed and computes mor's logits
(fp32, 1e-5), greedy ``generate`` equals ``mor.LLM``, lm-eval's HF model gives the native
adapter's log-likelihoods; a Llama directory converts to a mor checkpoint; bad input gives one
clear error and writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mor
import mor.interop
from mor import MoRForCausalLM, checkpoint as ckpt, preset
from mor.cli import main
from mor.interop.hf_export import ExportError, export_hf
from test_eval import _docs

transformers = pytest.importorskip("transformers")

CASES = {
    "vanilla": dict(architecture="vanilla", tie_word_embeddings=False),
    "recursive": dict(architecture="recursive"),
    "recursive_shared": dict(architecture="recursive", kv_mode="shared", sharing="cycle", num_hidden_layers=6),
    "expert": dict(architecture="mor"),
    "expert_aux": dict(architecture="mor", use_aux_router=True),
    "expert_shared": dict(architecture="mor", kv_mode="shared"),
    "expert_mlp_untied": dict(architecture="mor", router_arch="mlp", tie_word_embeddings=False,
                              router_func="tanh"),
    "token": dict(architecture="mor", router_type="token", router_func="softmax", router_alpha=1.0),
    "token_shared": dict(architecture="mor", router_type="token", kv_mode="shared", router_func="sigmoid"),
}
LL_CASES = ("expert", "token")  # lm-eval through HF
VOCAB = 300


def _tokenizer():
    from mor.data import train_tokenizer

    return train_tokenizer(_docs(4, 300, 123), VOCAB)


def _model(seed: int, architecture: str, **kw) -> MoRForCausalLM:
    nr = 1 if architecture == "vanilla" else 3
    cfg = preset("tiny", architecture, nr, max_position_embeddings=64, vocab_size=VOCAB, **kw)
    torch.manual_seed(seed)
    model = MoRForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights: varied greedy outputs and token-to-token routing
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if "router" in name else 0.15)
    return model


PROMPTS = [_docs(1, n, 40 + n)[0] for n in (3, 6, 9)]
MAX_NEW = 10
X = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(7))


def _pairs():
    pairs = [(" ".join(t.split()[:2 + i]), " " + " ".join(t.split()[2 + i:5 + i])) for i, t in enumerate(_docs(5, 9, 3))]
    return pairs + [("", " the quick brown fox"), ("the lazy dog ", "jumps")]


ROLLING = _docs(2, 40, 4)  # longer than max_length=64 tokens: several windows

NO_MOR_SCRIPT = textwrap.dedent('''
    import json, sys
    sys.modules["mor"] = None  # `import mor` raises ImportError from here on
    try:
        import mor  # noqa: F401
        raise SystemExit("mor is importable")
    except ImportError:
        pass
    import torch
    import transformers
    spec = json.load(open(sys.argv[1]))
    x = torch.tensor(spec["x"])
    res = {}
    for name, d in spec["exports"].items():
        remote = name != "vanilla"
        m = transformers.AutoModelForCausalLM.from_pretrained(d, trust_remote_code=remote).eval()
        tok = transformers.AutoTokenizer.from_pretrained(d, trust_remote_code=remote)
        r = {"class": type(m).__module__ + "." + type(m).__name__}
        with torch.no_grad():
            r["logits"] = m(x).logits
            if remote:
                r["logits_threshold"] = m(x, routing="threshold").logits
                labels = x.clone()
                r["loss"] = m(x, labels=labels).loss
        r["generated"] = []
        for p in spec["prompts"]:
            ids = tok(p, return_tensors="pt").input_ids
            g = m.generate(ids, max_new_tokens=spec["max_new"], do_sample=False)
            r["generated"].append(g[0, ids.shape[1]:].tolist())
        if name == "expert":  # save_pretrained (as push_to_hub does) carries the code along
            m.save_pretrained(d + "-resaved")
            m2 = transformers.AutoModelForCausalLM.from_pretrained(d + "-resaved", trust_remote_code=True).eval()
            with torch.no_grad():
                r["resaved_logits"] = m2(x).logits
        res[name] = r
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    for name in spec["ll_cases"]:
        lm = HFLM(pretrained=spec["exports"][name], trust_remote_code=True, batch_size=1, device="cpu")
        reqs = [Instance(request_type="loglikelihood", doc={}, arguments=tuple(p), idx=0) for p in spec["pairs"]]
        res[name]["ll"] = lm.loglikelihood(reqs, disable_tqdm=True)
        reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0) for t in spec["rolling"]]
        res[name]["rolling"] = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    # model_args reach from_pretrained: the causal rule allows padded batches
    lm = HFLM(pretrained=spec["exports"]["expert"], trust_remote_code=True, batch_size=4, device="cpu",
              routing="threshold")
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=tuple(p), idx=0) for p in spec["pairs"]]
    res["expert"]["ll_threshold"] = lm.loglikelihood(reqs, disable_tqdm=True)
    res["_mor_modules"] = sorted(k for k, v in sys.modules.items() if v is not None and (k == "mor" or k.startswith("mor.")))
    torch.save(res, sys.argv[2])
''')


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case saved as a mor checkpoint, exported, and loaded by transformers in a
    subprocess that cannot import mor. Returns (tmp dir, models, subprocess results)."""
    root = tmp_path_factory.mktemp("hf_export")
    tok = _tokenizer()
    models, exports = {}, {}
    for i, (name, kw) in enumerate(CASES.items()):
        kw = dict(kw)
        model = _model(i, kw.pop("architecture"), **kw)
        models[name] = model
        ck = ckpt.save_checkpoint(root / "ckpt" / name, model, tokenizer=tok)
        exports[name] = str(export_hf(ck, root / "hf" / name))
    spec = {"x": X.tolist(), "exports": exports, "prompts": PROMPTS, "max_new": MAX_NEW,
            "ll_cases": list(LL_CASES), "pairs": _pairs(), "rolling": ROLLING}
    (root / "spec.json").write_text(json.dumps(spec))
    (root / "run.py").write_text(NO_MOR_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(root / "modules"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-s", str(root / "run.py"), str(root / "spec.json"), str(root / "res.pt")],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    return root, models, tok, torch.load(root / "res.pt", weights_only=False)


def test_subprocess_had_no_mor(exported):
    _, _, _, res = exported
    assert res["_mor_modules"] == []
    assert res["vanilla"]["class"] == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    for name in CASES:
        if name != "vanilla":
            assert res[name]["class"].startswith("transformers_modules.") and res[name]["class"].endswith(
                ".modeling_mor.MoRForCausalLM")


@pytest.mark.parametrize("name", list(CASES))
def test_hf_logits_equal_mor_logits(exported, name):
    _, models, _, res = exported
    model = models[name]
    with torch.no_grad():
        torch.testing.assert_close(res[name]["logits"], model(X).logits, atol=1e-5, rtol=1e-5)
        if name != "vanilla":
            torch.testing.assert_close(res[name]["logits_threshold"], model(X, routing="threshold").logits,
                                       atol=1e-5, rtol=1e-5)
            # Hugging Face labels (= input_ids, shifted inside) -> mor's next-token targets, plus aux losses
            mor_labels = torch.nn.functional.pad(X[:, 1:], (0, 1), value=-100)
            torch.testing.assert_close(res[name]["loss"], model(X, labels=mor_labels).loss, atol=1e-5, rtol=1e-5)


def test_save_pretrained_of_an_export_loads_again(exported):
    _, models, _, res = exported
    torch.testing.assert_close(res["expert"]["resaved_logits"], res["expert"]["logits"], atol=0, rtol=0)


def test_routing_modes_differ_for_expert_choice(exported):
    """The two expert-choice rules give different logits here, so the checks above can tell them apart."""
    _, _, _, res = exported
    assert not torch.allclose(res["expert"]["logits"], res["expert"]["logits_threshold"], atol=1e-3)


@pytest.mark.parametrize("name", list(CASES))
def test_hf_generate_equals_mor_llm(exported, name):
    _, models, tok, res = exported
    llm = mor.LLM(models[name], tok, device="cpu")
    outs = llm.generate(PROMPTS, mor.SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    got = res[name]["generated"]
    for o, g in zip(outs, got):
        assert o.token_ids == g[:len(o.token_ids)]
        assert len(o.token_ids) == len(g) or o.finish_reason == "stop"
    assert len({tuple(g) for g in got}) > 1  # not one degenerate output for every prompt


@pytest.mark.parametrize("name", LL_CASES)
def test_hf_lm_eval_equals_native_adapter(exported, name):
    from lm_eval.api.instance import Instance

    from mor.eval.lm_eval_adapter import MoRLM

    _, models, tok, res = exported
    native = MoRLM(model=models[name], tokenizer=tok, batch_size=4)  # routing: topk, the adapter's default
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=0) for p in _pairs()]
    for (a, ga), (b, gb) in zip(native.loglikelihood(reqs), res[name]["ll"]):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0) for t in ROLLING]
    assert native.loglikelihood_rolling(reqs) == pytest.approx(res[name]["rolling"], abs=1e-3)
    if name == "expert":
        native = MoRLM(model=models[name], tokenizer=tok, batch_size=4, routing="threshold")
        reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=0) for p in _pairs()]
        thr = native.loglikelihood(reqs)
        for (a, ga), (b, gb) in zip(thr, res[name]["ll_threshold"]):
            assert a == pytest.approx(b, abs=1e-4) and ga == gb
        assert [a for a, _ in thr] != pytest.approx([b for b, _ in res[name]["ll"]], abs=1e-3)  # the rules differ


def test_export_layout(exported):
    root, models, _, _ = exported
    van = root / "hf" / "vanilla"
    assert not list(van.glob("*.py"))
    cfg = json.loads((van / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    ex = root / "hf" / "expert"
    cfg = json.loads((ex / "config.json").read_text())
    assert cfg["model_type"] == "mor" and cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_mor.MoRForCausalLM"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"):
        assert (ex / f).is_file()
    # shared weights once: the tied head is not stored, each unique layer once
    from safetensors.torch import load_file
    keys = set(load_file(ex / "model.safetensors"))
    assert "lm_head.weight" not in keys
    assert {k for k in keys if k.startswith("model.layers.")} == {
        k for k in models["expert"].state_dict() if k.startswith("model.layers.")}
    # bundled code imports nothing from mor; deferred library imports raise instead
    for f in ex.glob("*.py"):
        imports = [ln.strip() for ln in f.read_text().splitlines() if ln.strip().startswith(("import ", "from "))]
        assert not [ln for ln in imports if ln.startswith(("from mor", "import mor", "from .."))], f.name
    assert "is part of the mor library" in (ex / "mor_model.py").read_text()
    # transformers (and the Hub) copy exactly the files modeling_mor.py names, recursively
    from transformers.dynamic_module_utils import get_relative_import_files
    named = {Path(p).name for p in get_relative_import_files(str(ex / "modeling_mor.py"))}
    assert named == {f.name for f in ex.glob("*.py")} - {"modeling_mor.py"}


def test_auto_classes_know_mor_when_registered(exported):
    """With mor installed, AutoConfig/AutoModelForCausalLM load the export without remote code."""
    root, models, _, _ = exported
    mor.interop.register_hf()
    from mor.interop.hf_remote.configuration_mor import MoRConfig
    from mor.interop.hf_remote.modeling_mor import MoRForCausalLM as HFMoR

    d = root / "hf" / "token"
    assert type(transformers.AutoConfig.from_pretrained(d)) is MoRConfig
    m = transformers.AutoModelForCausalLM.from_pretrained(d)
    assert type(m) is HFMoR
    assert m.lm_head.weight is m.model.embed_tokens.weight  # re-tied
    with torch.no_grad():
        torch.testing.assert_close(m(X).logits, models["token"](X).logits, atol=1e-5, rtol=1e-5)
    # from_pretrained kwargs set the default routing
    m = transformers.AutoModelForCausalLM.from_pretrained(root / "hf" / "expert", routing="threshold")
    with torch.no_grad():
        torch.testing.assert_close(m(X).logits, models["expert"](X, routing="threshold").logits, atol=1e-5, rtol=1e-5)


def test_padding_masks(exported):
    root, _, _, _ = exported
    mor.interop.register_hf()
    m = transformers.AutoModelForCausalLM.from_pretrained(root / "hf" / "expert")
    mask = torch.ones_like(X)
    mask[0, -3:] = 0  # right padding
    with pytest.raises(ValueError, match="no padding mask"):
        m(X, attention_mask=mask)  # top-k is not causal: padding would change the routing
    with torch.no_grad():
        a = m(X, attention_mask=mask, routing="threshold").logits
        b = m(X, routing="threshold").logits
    torch.testing.assert_close(a, b)
    mask = torch.ones_like(X)
    mask[0, :3] = 0  # left padding
    with pytest.raises(ValueError, match="no padding mask"):
        m(X, attention_mask=mask, routing="threshold")


# ---------------------------------------------------------------------- Llama in, CLI, bad input
def _run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, json.loads(cap.out.strip().splitlines()[-1]), cap.err


def _tiny_llama(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = tmp_path / "llama"
    hf.save_pretrained(d)
    _tokenizer().save(str(d / "tokenizer.json"))
    return hf, d


def test_cli_llama_to_mor_to_hf(tmp_path, capsys):
    hf, d = _tiny_llama(tmp_path)
    rc, out, _ = _run(["export", str(d), str(tmp_path / "ck")], capsys)
    assert rc == 0 and out["format"] == "mor"
    model = ckpt.load_model(tmp_path / "ck")
    assert ckpt.load_tokenizer(tmp_path / "ck") is not None
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, hf(X).logits, atol=1e-5, rtol=1e-5)
    rc, out, _ = _run(["export", str(tmp_path / "ck"), str(tmp_path / "back"), "--format", "hf"], capsys)
    assert rc == 0 and out["format"] == "hf"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(back(X).logits, hf(X).logits, atol=1e-5, rtol=1e-5)


def _no_out(tmp_path, out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_bad_input_one_clear_error_nothing_written(tmp_path, capsys):
    out = tmp_path / "out"
    # wrong directory
    rc, js, err = _run(["export", str(tmp_path / "nope"), str(out)], capsys)
    assert rc == 2 and js["status"] == "error" and "not found" in js["error"] and err.count("\n") == 1
    _no_out(tmp_path, out)
    # missing files: a checkpoint without weights
    ck = ckpt.save_checkpoint(tmp_path / "ck", _model(0, "mor"), tokenizer=_tokenizer())
    (ck / "model.safetensors").rename(tmp_path / "weights.bak")
    rc, js, _ = _run(["export", str(ck), str(out)], capsys)
    assert rc == 2 and "model.safetensors" in js["error"]
    _no_out(tmp_path, out)
    (tmp_path / "weights.bak").rename(ck / "model.safetensors")
    # shape mismatch: config.json says something the weights are not
    c = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**c, "intermediate_size": 96}))
    rc, js, _ = _run(["export", str(ck), str(out)], capsys)
    assert rc == 2 and "shape" in js["error"] and "96" in js["error"]
    _no_out(tmp_path, out)
    # a pickle that is not plain tensors
    _, d = _tiny_llama(tmp_path)
    from safetensors.torch import load_file
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    sd["evil"] = _Payload()
    torch.save(sd, d / "pytorch_model.bin")
    rc, js, _ = _run(["export", str(d), str(out)], capsys)
    assert rc == 2 and "weights_only" in js["error"]
    _no_out(tmp_path, out)
    # OUT in the way: refused, its content kept
    (ck / "config.json").write_text(json.dumps(c))
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, js, _ = _run(["export", str(ck), str(out)], capsys)
    assert rc == 2 and "not empty" in js["error"] and (out / "keep.txt").read_text() == "x"
    rc, js, _ = _run(["export", str(ck), str(out), "--force"], capsys)
    assert rc == 0 and not (out / "keep.txt").exists() and (out / "modeling_mor.py").is_file()


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_failure_while_writing_leaves_out_untouched(tmp_path, monkeypatch):
    ck = ckpt.save_checkpoint(tmp_path / "ck", _model(0, "mor"), tokenizer=_tokenizer())
    out = tmp_path / "out"
    export_hf(ck, out)
    before = sorted(p.name for p in out.iterdir())

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_hf(ck, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    with pytest.raises(ExportError, match="routing"):
        export_hf(ck, tmp_path / "o2", routing="random")


LM_EVAL_NO_MOR = textwrap.dedent('''
    import sys
    sys.modules["mor"] = None  # `import mor` raises ImportError from here on
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval"] + sys.argv[1:]
    cli_evaluate()
''')


def _samples(out_dir: Path) -> dict[int, list]:
    f = next(out_dir.rglob("samples_mor_piqa_*.jsonl"))
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    return {r["doc_id"]: r["filtered_resps"] for r in rows}


@pytest.mark.slow
def test_lm_eval_cli_hf_model_equals_native_adapter(tmp_path):
    """`lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True` (mor not importable)
    scores an offline task exactly as the native adapter does."""
    from mor.eval import tasks as T
    from test_eval import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", "mor", seed=4, max_position_embeddings=256)
    out = export_hf(ck, tmp_path / "hf")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mor_piqa.yaml").write_text((T.write_task_dir(tmp_path / "all") / "mor_piqa.yaml").read_text())
    (tmp_path / "run.py").write_text(LM_EVAL_NO_MOR)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    common = ["--tasks", "mor_piqa", "--limit", "6", "--log_samples", "--include_path", str(tasks), "--device", "cpu"]
    p = subprocess.run([sys.executable, "-s", str(tmp_path / "run.py"), "--model", "hf", "--model_args",
                        f"pretrained={out},trust_remote_code=True", "--output_path", str(tmp_path / "r_hf"), *common],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    env_native = dict(os.environ, HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "mor.eval.lm_eval_cli", "--model", "mor", "--model_args",
                        f"pretrained={ck}", "--output_path", str(tmp_path / "r_mor"), *common[:-2]],
                       cwd=tmp_path, env=env_native, capture_output=True, text=True, timeout=900,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = _samples(tmp_path / "r_hf"), _samples(tmp_path / "r_mor")
    assert sorted(a) == sorted(b) and len(a) == 6
    for k in a:
        for (la, ga), (lb, gb) in zip(a[k], b[k]):
            assert float(la) == pytest.approx(float(lb), abs=1e-4) and ga == gb


def test_mor_export_reads_back(exported, tmp_path, capsys):
    """A `mor export` directory (e.g. from the Hub) loads back into mor: from_hf and the CLI."""
    root, models, _, _ = exported
    d = root / "hf" / "expert_mlp_untied"
    m = MoRForCausalLM.from_hf(d)
    assert m.config == models["expert_mlp_untied"].config
    with torch.no_grad():
        torch.testing.assert_close(m(X).logits, models["expert_mlp_untied"](X).logits, atol=0, rtol=0)
    rc, out, _ = _run(["export", str(root / "hf" / "token"), str(tmp_path / "ck")], capsys)
    assert rc == 0 and out["format"] == "mor"
    with torch.no_grad():
        torch.testing.assert_close(ckpt.load_model(tmp_path / "ck")(X).logits, models["token"](X).logits, atol=0, rtol=0)
