"""`mor import-official`: checkpoints written by the authors' MoR code.

The expert-choice fixture in /work/shared/fixtures/official-mor was written by the official
code, with the official forward's logits and selections; the token-choice and KV-sharing
fixtures are written here, at run time, by a writer that follows the format description of
that fixture's README (not the importer's key map)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mor import checkpoint as ckpt
from mor.config import ModelConfig
from mor.interop.official import OfficialFormatError, import_official, load_official
from mor.model import MoRForCausalLM

FIXTURE = Path("/work/shared/fixtures/official-mor/expert")
pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="official fixture not available")


def _recipe() -> dict:
    return yaml.safe_load((FIXTURE / "mor_cfg.yaml").read_text())


def _copy_fixture(tmp_path: Path, recipe: dict | None = None) -> tuple[Path, Path]:
    d = tmp_path / "official"
    shutil.copytree(FIXTURE, d)
    for f in d.iterdir():
        f.chmod(0o644)
    d.chmod(0o755)
    y = d / "mor_cfg.yaml"
    if recipe is not None:
        y.write_text(yaml.safe_dump(recipe))
    return d, y


def test_official_expert_fixture_reproduces_reference(tmp_path):
    out = tmp_path / "imported"
    s = import_official(FIXTURE, FIXTURE / "mor_cfg.yaml", out)
    assert (s["architecture"], s["router_type"], s["num_recursions"]) == ("mor", "expert", 3)
    model = ckpt.load_model(out)
    c = model.config
    assert (c.sharing, c.router_func, c.router_alpha, c.aux_loss_coeff) == ("middle_cycle", "sigmoid", 0.1, 0.001)
    # the tied head is not stored; each shared tensor is stored once
    from safetensors.torch import load_file
    stored = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in stored and len(stored) == 4 * 9 + 2 + 3
    ref = torch.load(FIXTURE / "reference.pt", weights_only=True)
    x = ref["input_ids"]
    y = torch.cat([x[:, 1:], torch.full((x.size(0), 1), -100)], 1)
    with torch.no_grad():
        out_eval = model(x, labels=y, routing="topk")
    torch.testing.assert_close(out_eval.logits, ref["logits_eval"], rtol=0, atol=1e-5)
    assert out_eval.selected[0] is None  # capacity 1: every position
    assert torch.equal(ref["selected_positions"][0], torch.arange(48).expand(2, 48))
    for r in (1, 2):
        assert torch.equal(out_eval.selected[r], ref["selected_positions"][r])
    # LM loss: mean over targets equals the official eval loss; the official trainer divides
    # the summed NLL by B*T instead (docs/model.md), i.e. by 48 instead of 47 per row here
    torch.testing.assert_close(out_eval.lm_loss, ref["lm_loss_eval_mean"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out_eval.lm_loss * 47 / 48, ref["train_lm_loss_official_norm"], rtol=0, atol=1e-5)
    model.train()
    with torch.no_grad():
        out_train = model(x, labels=y)
    torch.testing.assert_close(out_train.aux_losses["router_bce"] / 0.001, ref["train_sampling_loss"],
                               rtol=0, atol=1e-5)


def test_imported_checkpoint_generates_and_evaluates(tmp_path, data_dir, capsys):
    from mor.cli import main
    from mor.engine import LLM, SamplingParams

    out = tmp_path / "imported"
    assert main(["import-official", str(FIXTURE), "--recipe", str(FIXTURE / "mor_cfg.yaml"), str(out),
                 "--tokenizer", data_dir]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["status"] == "ok" and last["router_type"] == "expert"
    assert main(["generate", str(out), "--prompt", "the quick", "--max-tokens", "5", "--temperature", "0"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["status"] == "ok"
    llm = LLM(str(out))
    res = llm.generate(["the quick brown", "a lazy dog"], SamplingParams(max_tokens=6, temperature=0.0))
    assert len(res) == 2 and all(len(r.token_ids) == 6 for r in res)
    assert main(["eval", str(out), "--data", data_dir, "--seq-len", "32", "--max-tokens", "512",
                 "--no-save"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (r,) = last["nll"].values()
    assert set(r["routing"]) == {"topk", "threshold"}


# ---------------------------------------------------------------------- own fixtures
def _hf_config(cfg: ModelConfig, arch: str = "MoRLlamaForCausalLM", **extra) -> dict:
    return {"architectures": [arch], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_position_embeddings, "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": True, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "rope_scaling": None, "torch_dtype": "float32", **extra}


_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def _layer(sd: dict, name: str, model: MoRForCausalLM, unique: int) -> None:
    for p in _PARTS:  # each tied copy stored as its own tensor, as the official save does
        sd[f"{name}.{p}.weight"] = model.state_dict()[f"model.layers.{unique}.{p}.weight"].clone()


def _router(sd: dict, name: str, router, scale: float = 1.0) -> None:
    """A router as the official LinearRouter / MLPRouter stores it: `router.weight`, or
    `router.0.weight` and `router.2.weight` (Linear, GELU, Linear)."""
    net = router.net
    if isinstance(net, torch.nn.Linear):
        sd[f"{name}.router.weight"] = net.weight.detach().clone() * scale
    else:
        sd[f"{name}.router.0.weight"] = net[0].weight.detach().clone() * scale
        sd[f"{name}.router.2.weight"] = net[2].weight.detach().clone()


def _write_official(d: Path, model: MoRForCausalLM, recipe: dict, hf_extra: dict | None = None,
                    router_scale: float = 1.0) -> None:
    """The README's layout (Middle-Cycle, L layers, N_r recursions, B = (L-2)/N_r): layer 0,
    expert-choice wrappers model.layers.{1+r}.block.{j} + mor_router (one per recursion) or
    ONE token-choice wrapper model.layers.1.block_list.{r}.{j} + mor_router [N_r, d] +
    router_bias, then the last layer."""
    c = model.config
    nr, B = c.num_recursions, (c.num_hidden_layers - 2) // c.num_recursions
    st = model.state_dict()
    sd = {"model.embed_tokens.weight": st["model.embed_tokens.weight"].clone(),
          "model.norm.weight": st["model.norm.weight"].clone(),
          "lm_head.weight": st["model.embed_tokens.weight"].clone()}
    _layer(sd, "model.layers.0", model, 0)
    if c.router_type == "expert":
        for r in range(nr):
            for j in range(B):
                _layer(sd, f"model.layers.{1 + r}.block.{j}", model, 1 + j)
            _router(sd, f"model.layers.{1 + r}.mor_router", model.model.routers[r], router_scale)
            if c.use_aux_router:
                _router(sd, f"model.layers.{1 + r}.mlp_router", model.model.aux_routers[r], router_scale)
        last = nr + 1
    else:
        for r in range(nr):
            for j in range(B):
                _layer(sd, f"model.layers.1.block_list.{r}.{j}", model, 1 + j)
        _router(sd, "model.layers.1.mor_router", model.model.router, router_scale)
        if c.balancing == "loss_free":  # official units: added to alpha * probability
            sd["model.layers.1.router_bias"] = st["model.balance_bias"] * c.router_alpha
        last = 2
    _layer(sd, f"model.layers.{last}", model, B + 1)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(_hf_config(c, **(hf_extra or {}))))
    torch.save(sd, d / "pytorch_model.bin")
    (d / "mor_cfg.yaml").write_text(yaml.safe_dump(recipe))


def _random_model(**kw) -> MoRForCausalLM:
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, num_recursions=3, sharing="middle_cycle",
                      **kw)
    torch.manual_seed(1)
    m = MoRForCausalLM(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("layernorm.weight") or n == "model.norm.weight":
                p.add_(0.2 * torch.randn_like(p))  # norms away from 1 catch a norm mapped to the wrong layer
            if "router" in n:
                p.mul_(20)  # decisive routing
    return m.eval()


def _check_same(imported: MoRForCausalLM, src: MoRForCausalLM) -> None:
    a, b = imported.state_dict(), src.state_dict()
    assert set(a) == set(b)
    for k in b:
        if k == "model.balance_bias":
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(a[k], b[k]), k
    x = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(imported(x).logits, src(x).logits, rtol=0, atol=1e-5)


def test_token_choice_loss_free_fixture_imports(tmp_path):
    src = _random_model(architecture="mor", router_type="token", router_func="sigmoid", balancing="loss_free")
    with torch.no_grad():
        src.model.balance_bias.copy_(torch.tensor([0.3, -0.2, 0.05]))
    r = _recipe()
    r["mor"].update(type="token", capacity=None)
    r["mor"]["token"].update(router_func="sigmoid", alpha=0.1, balancing="loss_free", u=0.002)
    _write_official(tmp_path / "tok", src, r)
    out = tmp_path / "out"
    s = import_official(tmp_path / "tok", tmp_path / "tok" / "mor_cfg.yaml", out)
    assert s["router_type"] == "token"
    m = ckpt.load_model(out)
    c = m.config
    assert (c.router_func, c.router_alpha, c.balancing) == ("sigmoid", 0.1, "loss_free")
    assert c.balance_bias_rate == pytest.approx(0.002 / 0.1)  # official u is in alpha * p units
    _check_same(m, src)


def test_token_choice_loss_balancing_scales_coeff_by_alpha(tmp_path):
    src = _random_model(architecture="mor", router_type="token", router_func="softmax", balancing="loss")
    r = _recipe()
    r["mor"].update(type="token", router_type="linear")
    r["mor"]["token"].update(router_func="softmax", alpha=1.0, balancing="loss", coeff=0.1)
    _write_official(tmp_path / "tok", src, r)
    m, _, _ = load_official(tmp_path / "tok", tmp_path / "tok" / "mor_cfg.yaml")
    assert m.config.balance_coeff == pytest.approx(0.1) and m.config.router_func == "softmax"
    _check_same(m, src)


def test_kv_sharing_expert_fixture_imports(tmp_path):
    src = _random_model(architecture="mor", router_type="expert", kv_mode="shared")
    r = _recipe()
    r["kv_sharing"].update(enable=True, num_recursion=3, sharing="middle_cycle")
    kv = {"enable": True, "base_depth": 2, "num_recursion": 3, "sharing": "middle_cycle", "update_cache": False}
    _write_official(tmp_path / "kv", src, r, hf_extra={"kv_sharing": kv})
    m, _, _ = load_official(tmp_path / "kv", tmp_path / "kv" / "mor_cfg.yaml")
    assert m.config.kv_mode == "shared"
    _check_same(m, src)


def test_mlp_aux_router_with_temperature_imports(tmp_path):
    """MLP routers, the auxiliary router (`mlp_router`) and mor.temp: the official router
    sees x / temp, so its stored first layer is temp times the equivalent mor weight."""
    src = _random_model(architecture="mor", router_type="expert", router_arch="mlp", use_aux_router=True)
    r = _recipe()
    r["mor"].update(router_type="wide_mlp", temp=2.0)  # the official wide_mlp has the mlp's shape
    r["mor"]["expert"].update(sampling="aux_router")
    _write_official(tmp_path / "mlp", src, r, router_scale=2.0)
    m, _, notes = load_official(tmp_path / "mlp", tmp_path / "mlp" / "mor_cfg.yaml")
    assert (m.config.router_arch, m.config.use_aux_router) == ("mlp", True)
    assert any("temp" in n for n in notes)
    _check_same(m, src)
    with torch.no_grad():  # the auxiliary routers decide the causal (threshold) routing
        x = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(m(x, routing="threshold").logits, src(x, routing="threshold").logits,
                                   rtol=0, atol=1e-5)


def test_recursive_and_vanilla_official_checkpoints(tmp_path):
    """Official recursive runs are plain Llamas with tied layers (sharing_strategy); vanilla
    runs plain Llamas."""
    src = _random_model(architecture="recursive")
    st = src.state_dict()
    sd = {"model.embed_tokens.weight": st["model.embed_tokens.weight"].clone(),
          "model.norm.weight": st["model.norm.weight"].clone(),
          "lm_head.weight": st["model.embed_tokens.weight"].clone()}
    for l, u in enumerate([0, 1, 2, 1, 2, 1, 2, 3]):  # Middle-Cycle, L=8, N_r=3 (SPEC section 2)
        _layer(sd, f"model.layers.{l}", src, u)
    d = tmp_path / "rec"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_hf_config(src.config, arch="LlamaForCausalLM")))
    torch.save(sd, d / "pytorch_model.bin")
    r = _recipe()
    r["mor"]["enable"] = False
    (d / "mor_cfg.yaml").write_text(yaml.safe_dump(r))
    m, _, _ = load_official(d, d / "mor_cfg.yaml")
    assert m.config.architecture == "recursive"
    _check_same(m, src)
    r["recursive"]["enable"] = False
    (d / "mor_cfg.yaml").write_text(yaml.safe_dump(r))
    m, _, _ = load_official(d, d / "mor_cfg.yaml")
    assert m.config.architecture == "vanilla"
    assert torch.equal(m.model.layers[3].self_attn.q_proj.weight, src.model.layers[1].self_attn.q_proj.weight)


# ---------------------------------------------------------------------- refusals
def _refused(tmp_path, d: Path, y: Path, *needles: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(OfficialFormatError) as e:
        import_official(d, y, out)
    for n in needles:
        assert n in str(e.value), str(e.value)
    assert not out.exists()  # nothing written


def test_untied_copies_are_refused(tmp_path):
    d, y = _copy_fixture(tmp_path)
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    # before the official fix, attention was re-created per recursion: copies differ
    sd["model.layers.2.block.0.self_attn.q_proj.weight"] = sd["model.layers.2.block.0.self_attn.q_proj.weight"] + 1e-3
    torch.save(sd, d / "pytorch_model.bin")
    _refused(tmp_path, d, y, "model.layers.2.block.0.self_attn.q_proj.weight", "tied copies")


def test_missing_yaml_key_is_refused(tmp_path):
    r = _recipe()
    del r["mor"]["capacity"]
    d, y = _copy_fixture(tmp_path, r)
    _refused(tmp_path, d, y, "mor.capacity")


def test_null_capacity_is_the_official_default(tmp_path):
    r = _recipe()
    r["mor"]["capacity"] = None  # the released configs leave it null: (N_r - i) / N_r
    d, y = _copy_fixture(tmp_path, r)
    m, _, _ = load_official(d, y)
    assert m.config.resolved_capacities() == pytest.approx([1.0, 2 / 3, 1 / 3])


def test_relaxation_variant_is_refused(tmp_path):
    r = _recipe()
    r["relaxation"]["enable"] = True
    d, y = _copy_fixture(tmp_path, r)
    _refused(tmp_path, d, y, "relaxation.enable", "LoRA")


def test_unknown_lora_tensors_are_refused(tmp_path):
    d, y = _copy_fixture(tmp_path)
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    sd["model.layers.1.block.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 128)
    torch.save(sd, d / "pytorch_model.bin")
    _refused(tmp_path, d, y, "lora_A", "relaxation")


def test_unmappable_settings_are_refused(tmp_path):
    for path, value, needle in ((("mor", "expert", "gating"), "unweighted", "gating"),
                                (("mor", "rand_router"), True, "rand_router"),
                                (("recursive", "ln_share"), False, "ln_share")):
        r = copy.deepcopy(_recipe())
        node = r
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        sub = tmp_path / needle
        sub.mkdir()
        d, y = _copy_fixture(sub, r)
        _refused(sub, d, y, needle)


def test_existing_out_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OfficialFormatError, match="--overwrite"):
        import_official(FIXTURE, FIXTURE / "mor_cfg.yaml", out)
    assert (out / "keep.txt").read_text() == "mine"
