"""Up-training (mor.upcycle, `mor train --init-from-hf`): each init strategy places exactly
the source layers its documentation names, checked tensor by tensor against the source."""

from __future__ import annotations

import json

import pytest
import torch

from mor import checkpoint as ckpt
from mor.config import ConfigError, ModelConfig
from mor.model import MoRForCausalLM
from mor.upcycle import UpcycleError, layer_plan, target_config, upcycle

SHAPE = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)
PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def _vanilla(L: int, seed: int = 0) -> MoRForCausalLM:
    torch.manual_seed(seed)
    m = MoRForCausalLM(ModelConfig(architecture="vanilla", num_recursions=1, num_hidden_layers=L, **SHAPE))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p))  # distinct norms per layer
    return m


def _target(L: int, arch: str = "recursive", nr: int = 3, sharing: str = "middle_cycle", **kw) -> ModelConfig:
    return ModelConfig(architecture=arch, num_recursions=nr, sharing=sharing, num_hidden_layers=L, **SHAPE, **kw)


# The documented rules, written out by hand: {unique layer: source layers}.
EXPECTED = {
    # Middle-Cycle, L=8, N_r=3, B=2: layer map 0 (1 2)(1 2)(1 2) 3
    ("middle_cycle", 8, 3): {
        "stepwise": {0: [0], 1: [1], 2: [6], 3: [7]},  # round(linspace(1, 6, 2)) = 1, 6
        "lower": {0: [0], 1: [1], 2: [2], 3: [7]},
        "upper": {0: [0], 1: [5], 2: [6], 3: [7]},
        "average": {0: [0], 1: [1, 3, 5], 2: [2, 4, 6], 3: [7]},
    },
    # Middle-Cycle, L=14, N_r=3, B=4: stepwise round(linspace(1, 12, 4)) = 1, 4.67->5, 8.33->8, 12
    ("middle_cycle", 14, 3): {
        "stepwise": {0: [0], 1: [1], 2: [5], 3: [8], 4: [12], 5: [13]},
        "upper": {0: [0], 1: [9], 2: [10], 3: [11], 4: [12], 5: [13]},
        "average": {0: [0], 1: [1, 5, 9], 2: [2, 6, 10], 3: [3, 7, 11], 4: [4, 8, 12], 5: [13]},
    },
    # Cycle, L=9, N_r=3, B=3: layer map (0 1 2)(0 1 2)(0 1 2)
    ("cycle", 9, 3): {
        "stepwise": {0: [0], 1: [4], 2: [8]},
        "lower": {0: [0], 1: [1], 2: [2]},
        "upper": {0: [6], 1: [7], 2: [8]},
        "average": {0: [0, 3, 6], 1: [1, 4, 7], 2: [2, 5, 8]},
    },
    # Sequence, L=6, N_r=2, B=3: layer map (0 0)(1 1)(2 2); stepwise linspace(0, 5, 3) = 0, 2.5->2, 5
    ("sequence", 6, 2): {
        "stepwise": {0: [0], 1: [2], 2: [5]},
        "upper": {0: [3], 1: [4], 2: [5]},
        "average": {0: [0, 1], 1: [2, 3], 2: [4, 5]},
    },
    # Middle-Sequence, L=8, N_r=3, B=2: layer map 0 (1 1 1)(2 2 2) 3
    ("middle_sequence", 8, 3): {
        "stepwise": {0: [0], 1: [1], 2: [6], 3: [7]},
        "average": {0: [0], 1: [1, 2, 3], 2: [4, 5, 6], 3: [7]},
    },
}


@pytest.mark.parametrize("key", list(EXPECTED))
def test_layer_plan_follows_the_documented_rules(key):
    sharing, L, nr = key
    t = _target(L, nr=nr, sharing=sharing)
    for strategy, want in EXPECTED[key].items():
        assert layer_plan(L, t, strategy) == want, (key, strategy)


def test_random_strategy_draws_distinct_middle_layers_with_the_seed():
    t = _target(14)
    a, b = layer_plan(14, t, "random", seed=3), layer_plan(14, t, "random", seed=3)
    assert a == b
    body = [a[u][0] for u in (1, 2, 3, 4)]
    assert body == sorted(body) and len(set(body)) == 4 and all(1 <= s <= 12 for s in body)
    assert (a[0], a[5]) == ([0], [13])
    draws = {tuple(layer_plan(14, t, "random", seed=s)[u][0] for u in (1, 2, 3, 4)) for s in range(8)}
    assert len(draws) > 1


def test_shallower_target_picks_source_layers_evenly():
    # source L=10 does not fit Middle-Cycle N_r=3: the official code keeps 8 layers,
    # layer 0, round(linspace(1, 8, 6)) = 1 2 4 5 7 8 (2.4->2, 3.8->4, 5.2->5, 6.6->7), layer 9
    src = _vanilla(10).config
    t = target_config(src, {"architecture": "recursive", "num_recursions": 3})
    assert t.num_hidden_layers == 8
    assert layer_plan(10, t, "average") == {0: [0], 1: [1, 4, 7], 2: [2, 5, 8], 3: [9]}
    assert layer_plan(10, t, "upper") == {0: [0], 1: [7], 2: [8], 3: [9]}


@pytest.mark.parametrize("arch", ["recursive", "mor"])
@pytest.mark.parametrize("strategy", ["stepwise", "average", "lower", "upper", "random"])
def test_upcycle_places_source_tensors(arch, strategy):
    src = _vanilla(8)
    sst = {k: v.clone() for k, v in src.state_dict().items()}
    t = _target(8, arch=arch)
    model, plan = upcycle(src.config, src.state_dict(), t, strategy, seed=5)
    want = EXPECTED[("middle_cycle", 8, 3)].get(strategy) or plan
    assert plan == want
    st = model.state_dict()
    for u, srcs in want.items():
        for p in PARTS:
            exp = torch.stack([sst[f"model.layers.{s}.{p}.weight"] for s in srcs]).mean(0)
            torch.testing.assert_close(st[f"model.layers.{u}.{p}.weight"], exp, rtol=0, atol=0)
    for k in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(st[k], sst[k])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    if arch == "mor":  # routers fresh: the model's own initialisation
        w = model.model.routers[0].net.weight
        assert w.abs().max() > 0 and abs(w.std().item() - 0.02) < 0.01
    # the up-trained recursive model with stepwise/lower/upper is the source's layers looped
    if arch == "recursive" and strategy == "lower":
        x = torch.randint(0, 300, (1, 12))
        with torch.no_grad():
            assert torch.isfinite(model(x).logits).all()


def test_upcycle_from_hf_llama_directory(tmp_path):
    """A transformers LlamaForCausalLM directory as the source, checked against its tensors."""
    transformers = pytest.importorskip("transformers")
    from mor.upcycle import load_source

    hc = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hc)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p))
    hf.save_pretrained(tmp_path / "llama")
    source = load_source(tmp_path / "llama")
    t = target_config(source.config, {"architecture": "mor", "num_recursions": 3})
    model, plan = upcycle(source.config, source.state, t, "upper")
    assert plan == {0: [0], 1: [5], 2: [6], 3: [7]}
    hsd = hf.state_dict()
    for u, (s,) in plan.items():
        for p in PARTS:
            assert torch.equal(model.state_dict()[f"model.layers.{u}.{p}.weight"], hsd[f"model.layers.{s}.{p}.weight"])
    assert torch.equal(model.model.embed_tokens.weight, hsd["model.embed_tokens.weight"])


def test_target_config_errors():
    src = _vanilla(8).config
    with pytest.raises(UpcycleError, match="hidden_size"):
        target_config(src, {"architecture": "mor", "hidden_size": 64})
    with pytest.raises(UpcycleError, match="vanilla"):
        target_config(src, {"architecture": "vanilla", "num_recursions": 1})
    with pytest.raises(UpcycleError, match="exceeds"):
        target_config(src, {"architecture": "mor", "num_hidden_layers": 11})
    with pytest.raises(UpcycleError, match="tokenizer"):
        target_config(src, {"architecture": "mor"}, vocab_size=301)
    with pytest.raises(ConfigError, match="init_strategy"):
        layer_plan(8, _target(8), "middle")
    t = target_config(src, {"architecture": "mor", "router_type": "token", "num_recursions": 2})
    assert (t.hidden_size, t.num_hidden_layers, t.router_type) == (32, 8, "token")


def test_train_init_from_hf_with_a_mor_vanilla_checkpoint(tmp_path, data_dir):
    """`mor train --init-from-hf` accepts a mor vanilla checkpoint; with lr=1e-30 (lr must be
    > 0; an update that small is below every weight's last bit) the saved model is exactly the
    initialisation, which must follow the plan."""
    from mor.cli import main

    src = _vanilla(8)
    ckpt.save_checkpoint(tmp_path / "van", src, tokenizer=f"{data_dir}/tokenizer.json")
    common = ["data=" + data_dir, "seq_len=32", "batch_size=2", "max_steps=1", "lr=1e-30", "eval_batches=1",
              "progress=false", "tensorboard=false", "model.architecture=recursive", "model.num_recursions=3"]
    rc = main(["train", "--init-from-hf", str(tmp_path / "van"), f"out_dir={tmp_path / 'run'}",
               "init_strategy=upper", *common])
    assert rc == 0
    m = ckpt.load_model(tmp_path / "run")
    assert m.config.architecture == "recursive" and m.config.hidden_size == 32
    for u, s in {0: 0, 1: 5, 2: 6, 3: 7}.items():
        for p in PARTS:
            assert torch.equal(m.state_dict()[f"model.layers.{u}.{p}.weight"],
                               src.state_dict()[f"model.layers.{s}.{p}.weight"])
    # init_strategy without a pretrained model, and a bad strategy name, are refused
    assert main(["train", f"out_dir={tmp_path / 'r2'}", "init_strategy=upper", *common]) == 2
    assert main(["train", "--init-from-hf", str(tmp_path / "van"), f"out_dir={tmp_path / 'r3'}",
                 "init_strategy=bottom", *common]) == 2
    # a recursive source is refused
    assert main(["train", "--init-from-hf", str(tmp_path / "run"), f"out_dir={tmp_path / 'r4'}", *common]) == 2
