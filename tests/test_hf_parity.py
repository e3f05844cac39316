"""A vanilla model equals Hugging Face LlamaForCausalLM with the same weights (fp32)."""

import pytest
import torch

from mor import MoRForCausalLM, preset

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("kv_heads,tie", [(2, True), (4, False)])
def test_vanilla_matches_hf_llama(kv_heads, tie):
    cfg = preset("tiny", "vanilla", num_hidden_layers=3, num_key_value_heads=kv_heads, vocab_size=101,
                 tie_word_embeddings=tie, rope_theta=500.0)
    torch.manual_seed(0)
    ours = MoRForCausalLM(cfg).eval()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=False, mlp_bias=False, hidden_act="silu",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    if tie:
        hf.tie_weights()
    x = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = ours(x).logits
        b = hf(x).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
