import json

import pytest

from mor import ConfigError, ModelConfig, preset, PRESETS


@pytest.mark.parametrize("kw,words", [
    (dict(capacities=[0.5, 1.0, 0.3]), ["capacities", "non-increasing"]),
    (dict(capacities=[1.0, 0.5]), ["capacities", "3 entries"]),
    (dict(sharing="zigzag"), ["sharing", "'zigzag'", "middle_cycle", "sequence"]),
    (dict(hidden_size=100, num_attention_heads=3), ["num_attention_heads=3", "hidden_size=100"]),
    (dict(num_hidden_layers=9), ["num_hidden_layers=9", "middle_cycle", "nearest valid value is num_hidden_layers=11"]),
    (dict(router_func="softmax"), ["softmax", "expert", "sigmoid, tanh"]),
    (dict(router_type="tokens"), ["router_type", "expert, token"]),
    (dict(router_arch="big"), ["router_arch", "linear, mlp, wide_mlp"]),
    (dict(kv_mode="global"), ["kv_mode", "recursion_wise, shared"]),
    (dict(num_key_value_heads=3), ["num_key_value_heads=3", "valid values"]),
    (dict(kv_mode="shared", capacities=[0.9, 0.5, 0.2]), ["capacities[0]=1.0"]),
    (dict(router_type="token", router_func="tanh"), ["tanh", "softmax, sigmoid"]),
    (dict(architecture="transformer"), ["architecture", "vanilla, recursive, mor"]),
    (dict(balancing="aux"), ["balancing", "loss_free"]),
    (dict(capacities=[1.0, 0.5, 0.0]), ["(0, 1]"]),
])
def test_bad_configs_raise_clear_errors(kw, words):
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                num_hidden_layers=8, num_recursions=3)
    with pytest.raises(ConfigError) as e:
        ModelConfig(**{**base, **kw})
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_vanilla_with_recursions_is_rejected():
    with pytest.raises(ConfigError, match="num_recursions=3"):
        ModelConfig(architecture="vanilla", num_recursions=3)


def test_json_roundtrip_and_unknown_keys(tmp_path):
    cfg = preset("tiny", "mor", router_type="token", router_func="softmax")
    assert cfg.router_alpha == 1.0
    cfg.save(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "mor" and d["hidden_size"] == 64
    assert ModelConfig.load(tmp_path) == cfg
    d["hiden_size"] = 3
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="hiden_size"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.load(tmp_path)


def test_presets():
    assert set(PRESETS) >= {"smollm-135m", "smollm-360m", "smollm-730m", "smollm-1.7b", "tiny", "small"}
    cfg = preset("smollm-360m", "mor", 4)
    assert cfg.num_hidden_layers == 34 and cfg.vocab_size == 49152 and cfg.head_dim == 64
    assert preset("smollm-360m", "mor", 3).num_hidden_layers == 32
    assert preset("smollm-360m", "vanilla").num_recursions == 1
    assert preset("smollm-135m", "recursive", 3).num_hidden_layers == 32
    assert ModelConfig(architecture="mor", router_func="sigmoid").router_alpha == 0.1
    assert preset("tiny", "mor").resolved_capacities() == [1.0, 2 / 3, 1 / 3]
    with pytest.raises(ConfigError, match="preset"):
        preset("gpt2")


def test_defaults_follow_architecture_and_router_type():
    """Fixes of issue 11: vanilla needs no num_recursions=1; token-choice defaults to the
    paper's final design (softmax router, alpha 1); expert-choice keeps sigmoid, alpha 0.1."""
    van = ModelConfig(architecture="vanilla")
    assert van.num_recursions == 1 and van.structure()[1] == []
    assert ModelConfig().num_recursions == 3 and ModelConfig(architecture="recursive").num_recursions == 3
    tok = ModelConfig(router_type="token")
    assert (tok.router_func, tok.router_alpha) == ("softmax", 1.0)
    assert (ModelConfig(router_type="token", router_func="sigmoid").router_alpha) == 0.1
    exp = ModelConfig()
    assert (exp.router_func, exp.router_alpha) == ("sigmoid", 0.1)
    # a saved config keeps its resolved values, so old checkpoints keep their meaning
    assert ModelConfig.from_dict(dict(tok.to_dict(), router_func="sigmoid", router_alpha=0.1)).router_func == "sigmoid"


def test_enter_fractions_one_definition():
    from mor.cache import expected_kv_layers_per_token
    from mor.flops import active_fractions
    for cfg in (preset("tiny", "mor"), preset("tiny", "mor", router_type="token"), preset("tiny", "recursive"),
                preset("tiny", "vanilla"), preset("tiny", "mor", capacities=[1.0, 0.5, 0.25])):
        f = cfg.enter_fractions()
        assert active_fractions(cfg) == f
        full = 2 if cfg.architecture != "vanilla" else 8
        assert expected_kv_layers_per_token(cfg) == pytest.approx(full + cfg.layers_per_recursion * sum(f))
    assert preset("tiny", "mor", router_type="token").enter_fractions() == [1.0, 2 / 3, 1 / 3]
    assert preset("tiny", "mor", capacities=[1.0, 0.5, 0.25]).enter_fractions() == [1.0, 0.5, 0.25]
