"""Named model variants (mor.variants): the grammar, the fields each sets, and that the
experiment and both benchmarks build the same model from the same name."""

from __future__ import annotations

import pytest

from mor.config import ModelConfig, preset
from mor.experiment.plan import DEFAULT_MODELS
from mor.variants import Variant, VariantError, parse_variant, parse_variants

DEFAULT_NAMES = ["vanilla", "recursive-nr2", "recursive-nr3", "mor-expert-nr2", "mor-expert-nr3",
                 "mor-token-nr3", "mor-expert-kvshare-nr3", "mor-expert-cycle-nr2"]


def test_default_models_are_the_papers_table_plus_a_sharing_ablation():
    variants = parse_variants(DEFAULT_MODELS)
    assert [v.name for v in variants] == DEFAULT_NAMES
    by = {v.name: v for v in variants}
    assert by["mor-expert-kvshare-nr3"].model_fields()["kv_mode"] == "shared"
    assert by["mor-expert-cycle-nr2"].model_fields()["sharing"] == "cycle"
    tok = by["mor-token-nr3"].model_fields()
    assert tok["router_type"] == "token" and tok["router_func"] == "softmax" and tok["balancing"] == "loss"
    assert by["vanilla"].model_fields() == {"architecture": "vanilla", "num_recursions": 1}
    assert by["recursive-nr2"].label == "Recursive (Middle-Cycle)"


def test_model_axes_cross_and_errors():
    variants = parse_variants("vanilla,recursive,mor-expert,mor-token", nr="2,3", kv="recursion_wise,shared")
    assert [v.name for v in variants] == [
        "vanilla", "recursive-nr2", "recursive-nr3", "mor-expert-nr2", "mor-expert-kvshare-nr2", "mor-expert-nr3",
        "mor-expert-kvshare-nr3", "mor-token-nr2", "mor-token-kvshare-nr2", "mor-token-nr3", "mor-token-kvshare-nr3"]
    assert [v.name for v in parse_variants("recursive-middle-sequence:4,mor-expert-kvshare-cycle:2")] == [
        "recursive-middle-sequence-nr4", "mor-expert-kvshare-cycle-nr2"]
    # duplicates collapse; -nrN and :N name the same variant
    assert len(parse_variants("mor-expert:3,mor-expert,mor-expert-nr3", nr="3")) == 1
    for bad, match in [("transformer", "unknown model"), ("vanilla:2", "no recursions"),
                       ("mor-expert-wide", "unknown modifier"), ("recursive-kvshare", "MoR option"),
                       ("mor-expert:1", "N_r >= 2")]:
        with pytest.raises(VariantError, match=match):
            parse_variants(bad)
    with pytest.raises(VariantError, match="--kv"):
        parse_variants("mor-expert", kv="paged")


def test_every_name_reads_back_as_its_variant():
    for v in parse_variants("vanilla,recursive,mor-expert,mor-token", nr="2,3,4", kv="recursion_wise,shared",
                            sharing="cycle,middle_cycle,sequence,middle_sequence"):
        assert parse_variant(v.name) == v
    with pytest.raises(VariantError, match="N_r >= 2"):
        parse_variant("mor-expert")  # no N_r in the name and none given
    assert parse_variant("mor-expert", 4) == Variant("mor-expert", 4)


def test_config_sets_only_the_variant_fields_and_fits_layers():
    base = preset("small", "vanilla", num_hidden_layers=9, rope_theta=5e5, capacities=None)
    cfg = Variant("mor-expert", 3, kv_mode="shared").config(base)
    # the shape and everything outside KIND_KEYS come from the base; layers grow to fit (L - 2) % 3 == 0
    assert (cfg.hidden_size, cfg.vocab_size, cfg.rope_theta) == (base.hidden_size, base.vocab_size, 5e5)
    assert cfg.num_hidden_layers == 11 and cfg.architecture == "mor" and cfg.router_type == "expert"
    assert cfg.kv_mode == "shared" and cfg.router_alpha == 0.1 and cfg.capacities is None
    tok = parse_variant("mor-token-cycle-nr2").config(ModelConfig(use_aux_router=True))
    assert (tok.router_type, tok.router_func, tok.balancing, tok.sharing) == ("token", "softmax", "loss", "cycle")
    assert tok.use_aux_router is False and tok.num_hidden_layers == 8
    assert parse_variant("vanilla").config(cfg) == preset("small", "vanilla", num_hidden_layers=11, rope_theta=5e5)


def test_experiment_and_benchmarks_build_the_same_models(tmp_path):
    """A variant name means one model: the experiment's recipe, `mor bench train` and `mor bench infer`."""
    from mor.bench.infer import mor_config
    from mor.bench.train import model_config
    from mor.experiment.plan import Shape, model_recipe
    from mor.train import TrainConfig

    model_section = {"preset": "small", "num_hidden_layers": 14, "architecture": "mor", "router_type": "token"}
    shape = Shape("s", tmp_path / "s.yaml", {"model": model_section, "seq_len": 64}, paper=False)
    base = TrainConfig(model=dict(model_section), max_steps=1).model_config(8192)
    for name in ("vanilla", "recursive-nr2", "mor-expert-nr3", "mor-token-nr2", "mor-expert-kvshare-nr2"):
        variant = parse_variant(name)
        recipe = model_recipe(shape, variant, 1e12, "d", tmp_path, vocab_size=8192)
        from_experiment = TrainConfig.from_dict(recipe).model_config(8192)
        assert model_config(base, name, 3) == from_experiment, name
    # bench infer: expert-choice, Middle-Cycle; the same as the variant applied to the preset
    assert mor_config("small", 3, 14, "shared") == parse_variant("mor-expert-kvshare-nr3").config(
        preset("small", "vanilla", num_hidden_layers=14))
