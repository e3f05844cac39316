"""Reading transformers Llama directories: every layout gives HF's own logits (fp32, 1e-5),
and each kind of bad input gives one clear error."""

import json
import shutil

import pytest
import torch

from mor import MoRForCausalLM
from mor.interop.hf_llama import HFFormatError, read_llama_dir

transformers = pytest.importorskip("transformers")


def _tiny_llama(tie: bool, kv_heads: int = 2, seed: int = 0, **kw):
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=128, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, rope_theta=5000.0, **kw)
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1 and may zero nothing else; make every tensor distinct
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _save_bin(model, d, shards: int = 1):
    """Write pytorch_model.bin (or shards + index) the way transformers 4.x did."""
    d.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(d)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if shards == 1:
        torch.save(sd, d / "pytorch_model.bin")
        return
    keys = sorted(sd)
    wmap = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::shards]}
        torch.save(part, d / name)
        wmap.update({k: name for k in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))


def _save(model, d, layout):
    if layout == "safetensors":
        model.save_pretrained(d)
    elif layout == "sharded":
        model.save_pretrained(d, max_shard_size="20KB")
        assert (d / "model.safetensors.index.json").exists() and not (d / "model.safetensors").exists()
    elif layout == "bin":
        _save_bin(model, d)
    else:
        _save_bin(model, d, shards=3)
    return d


IDS = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "bin_sharded"])
@pytest.mark.parametrize("tie", [True, False])
def test_llama_dir_loads_with_identical_logits(tmp_path, layout, tie):
    hf = _tiny_llama(tie)
    d = _save(hf, tmp_path / "llama", layout)
    (d / "tokenizer.json").write_text("{}")
    ours = MoRForCausalLM.from_hf(d)
    assert ours.config.architecture == "vanilla" and ours.config.tie_word_embeddings == tie
    assert ours.config.rope_theta == 5000.0 and ours.config.rms_norm_eps == 1e-6
    if tie:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, hf(IDS).logits, atol=1e-5, rtol=1e-5)
    cfg, state, tok = read_llama_dir(d)
    assert tok == d / "tokenizer.json"
    # the state dict loads strictly into a freshly built model
    fresh = MoRForCausalLM(cfg)
    fresh.load_state_dict(state, strict=True)
    if tie:
        assert state["lm_head.weight"] is state["model.embed_tokens.weight"]


def test_no_tokenizer_and_mha(tmp_path):
    hf = _tiny_llama(False, kv_heads=4)
    d = _save(hf, tmp_path / "llama", "safetensors")
    cfg, state, tok = read_llama_dir(d)
    assert tok is None and cfg.num_key_value_heads == 4
    with torch.no_grad():
        torch.testing.assert_close(MoRForCausalLM.from_hf(d)(IDS).logits, hf(IDS).logits, atol=1e-5, rtol=1e-5)


def test_bf16_checkpoint_keeps_dtype_when_asked(tmp_path):
    hf = _tiny_llama(True).to(torch.bfloat16)
    d = _save(hf, tmp_path / "llama", "safetensors")
    assert MoRForCausalLM.from_hf(d).lm_head.weight.dtype == torch.float32
    assert MoRForCausalLM.from_hf(d, dtype=None).lm_head.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------------- bad input
def _err(d) -> str:
    with pytest.raises(HFFormatError) as e:
        read_llama_dir(d)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_wrong_directory(tmp_path):
    assert "not found" in _err(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "config.json" in _err(tmp_path / "empty")
    f = tmp_path / "file"
    f.write_text("x")
    assert "not a directory" in _err(f)


def test_missing_files(tmp_path):
    d = _save(_tiny_llama(True), tmp_path / "a", "safetensors")
    (d / "model.safetensors").unlink()
    assert "has no weights" in _err(d)
    d = _save(_tiny_llama(True), tmp_path / "b", "sharded")
    gone = sorted(d.glob("model-*.safetensors"))[1]
    gone.unlink()
    assert "missing" in _err(d) and gone.name in _err(d)
    d = _save(_tiny_llama(False), tmp_path / "c", "bin")
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    del sd["model.layers.1.mlp.up_proj.weight"]
    torch.save(sd, d / "pytorch_model.bin")
    assert "model.layers.1.mlp.up_proj.weight" in _err(d)
    d = _save(_tiny_llama(False), tmp_path / "d", "safetensors")
    from safetensors.torch import load_file, save_file
    sd = load_file(d / "model.safetensors")
    del sd["lm_head.weight"]  # untied: the head is required
    save_file(sd, d / "model.safetensors")
    assert "lm_head.weight" in _err(d)


def test_truncated_safetensors(tmp_path):
    d = _save(_tiny_llama(True), tmp_path / "a", "safetensors")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "cannot read" in _err(d)


def test_shape_mismatch(tmp_path):
    d = _save(_tiny_llama(True), tmp_path / "a", "safetensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _err(d)
    assert "mlp" in msg and "(32, 80)" in msg and "(32, 96)" in msg


class _Payload:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-mor-test-path",))


def test_pickle_that_is_not_plain_tensors_is_refused(tmp_path):
    d = _save(_tiny_llama(True), tmp_path / "a", "bin")
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    sd["payload"] = _Payload()
    torch.save(sd, d / "pytorch_model.bin")
    msg = _err(d)
    assert "weights_only" in msg and "refusing" in msg


@pytest.mark.parametrize("change,needle", [
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_type='llama3'"),
    ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling.rope_type='linear'"),
    ({"num_attention_heads": 3, "head_dim": None}, "num_attention_heads=3"),
])
def test_unsupported_config_names_the_value(tmp_path, change, needle):
    d = _save(_tiny_llama(True), tmp_path / "a", "safetensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    assert needle in _err(d)


def test_transformers4_style_config(tmp_path):
    """transformers 4.x wrote rope_theta at the top level and rope_scaling=None."""
    hf = _tiny_llama(False)
    d = _save(hf, tmp_path / "a", "safetensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=5000.0, rope_scaling=None)
    (d / "config.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        torch.testing.assert_close(MoRForCausalLM.from_hf(d)(IDS).logits, hf(IDS).logits, atol=1e-5, rtol=1e-5)
