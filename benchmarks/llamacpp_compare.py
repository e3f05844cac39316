"""Batch-1 decode: the ``mor`` engine against llama.cpp on the same weights (issue 17).

Not part of the test suite and not a dependency of the package: a side-by-side measurement
to run by hand. It builds the vanilla model that ``mor bench infer`` uses for the wide shape
(``preset("small", "vanilla", hidden_size=512, intermediate_size=1536)`` with 14 layers,
random weights from ``--seed``), writes it as GGUF (architecture ``llama``) in f32, f16 and
q8_0, checks that llama.cpp's logits match ``model(ids)``, then times greedy batch-1 decode
of ``--tokens`` new tokens after a short prompt, interleaving the contenders for
``--rounds`` rounds (best tok/s of each is reported):

* llama.cpp (llama-cpp-python) with f32 / f16 / q8_0 weights;
* our ``Engine`` in fp32 with the compiled CPU kernels (the default), in fp32 on PyTorch ops
  (``cpu_kernels=False``), and with ``decode_precision`` bf16-weights (bf16 copies of the
  matrices read by the CPU kernels) / bf16 / int8 (``--ours``).

Both sides use ``--threads`` threads (``torch.set_num_threads`` / ``n_threads``).
"decode tok/s" counts the tokens after the first one (the prompt's forward pass is not
timed); "e2e tok/s" is all new tokens over prompt + decode time. GB/s = weight bytes read
per token (every weight once; the tied embedding is the LM head) x decode tok/s; the KV
cache (< 2 % here) is not counted.

Setup (a separate venv, so the project's stays clean; llama-cpp-python compiles llama.cpp
with cmake, ~15 min on 2 cores)::

    python3 -m venv /work/llamacpp-venv
    /work/llamacpp-venv/bin/pip install llama-cpp-python gguf numpy
    /work/llamacpp-venv/bin/pip install torch==2.13.0       # the CPU build
    /work/llamacpp-venv/bin/pip install -e /work/main --no-deps
    /work/llamacpp-venv/bin/pip install tokenizers safetensors pyyaml tqdm   # what `import mor` needs

Run::

    /work/llamacpp-venv/bin/python benchmarks/llamacpp_compare.py [--threads 2] [--tokens 128]

Conversion notes: Q/K rows are permuted from Hugging Face's rotate_half layout to llama.cpp's
(as ``convert_hf_to_gguf.py`` does); the tied embedding is written once (``token_embd``, no
``output``) and llama.cpp uses it as the LM head. The check prints llama.cpp's f16 K/V cache
default (max |dlogit| ~1e-3) and an f32 K/V cache (~2e-6: the conversion is exact). Timing
uses llama.cpp's default f16 K/V cache (our engine's is fp32; either is < 2 % of the bytes).

Noise: both sides synchronise their threads with OpenMP (two runtimes in this process:
llama.cpp's libgomp and PyTorch's). With as many threads as cores and another busy process
on the machine, spinning barriers collapse (10x slower rounds, for both sides); best-of-N
rounds filters that. ``OMP_WAIT_POLICY=passive`` steadies them under load but costs
llama.cpp (a barrier per graph node) far more than our kernels, so compare with it unset.

GGUF files go to ``--workdir`` (default: a temporary directory, removed at the end). The
last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SHAPE = dict(name="small", hidden_size=512, intermediate_size=1536, num_hidden_layers=14)


# ---------------------------------------------------------------------- model
def build_model(seed: int):
    from mor.bench.infer import _build
    from mor.config import preset

    cfg = preset(SHAPE["name"], "vanilla", hidden_size=SHAPE["hidden_size"],
                 intermediate_size=SHAPE["intermediate_size"]).replace(num_hidden_layers=SHAPE["num_hidden_layers"])
    return _build(cfg, "cpu", torch.float32, seed)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the unique parameters and buffers (a tied weight counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def engine_weight_bytes(eng, variant: str) -> int:
    """Weight bytes one decode step reads: the engine model's parameters, except that with
    ``bf16-weights`` the CPU kernels read bf16 copies of the layers' matrices and the LM head."""
    if variant != "bf16-weights" or not eng.cpu_kernels:
        return weight_bytes(eng.model)
    m = eng.model
    mats = [m.lm_head.weight] + [lin.weight for layer in m.model.layers
                                 for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                             layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                                             layer.mlp.down_proj)]
    return weight_bytes(m) - sum(w.numel() * (w.element_size() - 2) for w in mats)


# ---------------------------------------------------------------------- GGUF
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate_half layout -> llama.cpp's interleaved rope layout (convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path, ftype: str) -> int:
    """Write ``model`` as a llama GGUF with weights in ``ftype`` (f32 | f16 | q8_0); returns the
    tensor data bytes."""
    import gguf

    cfg = model.config
    qtypes = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}
    ftypes = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"mor-vanilla-{cfg.num_hidden_layers}L-{cfg.hidden_size}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(ftypes[ftype])
    # a dummy SentencePiece-style vocabulary (llama.cpp needs one): <unk> <s> </s>, the 256
    # byte tokens, then placeholders
    tokens, types = ["<unk>", "<s>", "</s>"], [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    tokens += [f"<t{i}>" for i in range(len(tokens), cfg.vocab_size)]
    types += [gguf.TokenType.NORMAL] * (cfg.vocab_size - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)

    m = model.model
    sd = {"token_embd.weight": m.embed_tokens.weight, "output_norm.weight": m.norm.weight}
    if not cfg.tie_word_embeddings:
        sd["output.weight"] = model.lm_head.weight
    for i, layer in enumerate(m.layers):
        a, f = layer.self_attn, layer.mlp
        sd[f"blk.{i}.attn_norm.weight"] = layer.input_layernorm.weight
        sd[f"blk.{i}.attn_q.weight"] = ("q", a.q_proj.weight)
        sd[f"blk.{i}.attn_k.weight"] = ("k", a.k_proj.weight)
        sd[f"blk.{i}.attn_v.weight"] = a.v_proj.weight
        sd[f"blk.{i}.attn_output.weight"] = a.o_proj.weight
        sd[f"blk.{i}.ffn_norm.weight"] = layer.post_attention_layernorm.weight
        sd[f"blk.{i}.ffn_gate.weight"] = f.gate_proj.weight
        sd[f"blk.{i}.ffn_up.weight"] = f.up_proj.weight
        sd[f"blk.{i}.ffn_down.weight"] = f.down_proj.weight
    total = 0
    for name, t in sd.items():
        kind = None
        if isinstance(t, tuple):
            kind, t = t
        x = t.detach().float().cpu().numpy()
        if kind == "q":
            x = _permute(x, cfg.num_attention_heads)
        elif kind == "k":
            x = _permute(x, cfg.num_key_value_heads)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim == 1 or ftype == "f32":  # norms stay f32 (as convert_hf_to_gguf.py does)
            data, qt = x, qtypes["f32"]
        elif ftype == "f16":
            data, qt = x.astype(np.float16), qtypes["f16"]
        else:
            data, qt = gguf.quants.quantize(x, qtypes["q8_0"]), qtypes["q8_0"]
        w.add_tensor(name, data, raw_dtype=qt)
        total += data.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return total


# ---------------------------------------------------------------------- llama.cpp
def load_llama(path: Path, threads: int, n_ctx: int, logits_all: bool = False, f32_kv: bool = False):
    """A llama.cpp context; its K/V cache is f16 (llama.cpp's default) unless ``f32_kv``."""
    import llama_cpp

    kv = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_kv else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           n_gpu_layers=0, logits_all=logits_all, verbose=False, seed=0, **kv)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def last_logits(llm) -> np.ndarray:
    """The logits of the last evaluated token (llama-cpp-python fills ``scores`` only with
    ``logits_all``), read in place from llama.cpp's buffer."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def llama_decode(llm, prompt: list[int], n: int) -> dict:
    """Greedy decode of n tokens with eval + argmax on the last logits."""
    import llama_cpp

    llm.reset()
    ctx = llm._ctx.ctx
    llama_cpp.llama_perf_context_reset(ctx)
    t0 = time.perf_counter()
    llm.eval(prompt)
    out = [int(np.argmax(last_logits(llm)))]
    t1 = time.perf_counter()
    perf0 = llama_cpp.llama_perf_context(ctx)
    for _ in range(n - 1):
        llm.eval([out[-1]])
        out.append(int(np.argmax(last_logits(llm))))
    t2 = time.perf_counter()
    perf = llama_cpp.llama_perf_context(ctx)
    n_eval = perf.n_eval - perf0.n_eval
    t_eval = (perf.t_eval_ms - perf0.t_eval_ms) / 1e3
    return {"tokens": out, "decode_s": t2 - t1, "total_s": t2 - t0,
            "internal_decode_tok_s": n_eval / t_eval if t_eval > 0 and n_eval > 0 else None}


# ---------------------------------------------------------------------- ours
def make_engine(model, variant: str, max_len: int):
    from mor.engine import Engine

    kw = {"fp32-kernels": dict(cpu_kernels=True), "fp32-torch": dict(cpu_kernels=False)}.get(variant)
    if kw is None:
        kw = dict(decode_precision=variant)  # bf16 | fp16 | int8
    return Engine(model, max_batch=1, max_model_len=max_len, seed=0, **kw)


def ours_decode(eng, prompt: list[int], n: int) -> dict:
    from mor.engine import SamplingParams

    stamps = []
    eng.add_request(list(prompt), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    t0 = time.perf_counter()
    outs = eng.run_until_done(on_event=lambda ev: stamps.append(time.perf_counter()))
    t2 = time.perf_counter()
    toks = outs[0].token_ids
    assert len(toks) == n, (len(toks), n)
    return {"tokens": list(toks), "decode_s": t2 - stamps[0], "total_s": t2 - t0, "internal_decode_tok_s": None}


# ---------------------------------------------------------------------- main
def agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ours", default="fp32-kernels,fp32-torch,bf16-weights,bf16,int8",
                    help="our variants: fp32-kernels, fp32-torch, bf16-weights, bf16, fp16, int8 "
                         "(the last four are decode_precision values)")
    ap.add_argument("--llama", default="f32,f16,q8_0", help="llama.cpp weight types: f32, f16, q8_0")
    ap.add_argument("--workdir", default=None, help="where the GGUF files go (default: a temporary dir)")
    args = ap.parse_args(argv)

    import llama_cpp

    torch.set_num_threads(args.threads)
    model = build_model(args.seed)
    cfg = model.config
    n_ctx = args.prompt_len + args.tokens + 8
    g = torch.Generator().manual_seed(args.seed + 7)
    prompt = torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
    print(f"model: vanilla {cfg.num_hidden_layers}L d={cfg.hidden_size} ff={cfg.intermediate_size} "
          f"heads={cfg.num_attention_heads}/{cfg.num_key_value_heads} hd={cfg.head_dim} V={cfg.vocab_size} "
          f"tied={cfg.tie_word_embeddings}; threads={args.threads}; llama-cpp-python {llama_cpp.__version__}; "
          f"torch {torch.__version__}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
          f"load avg {os.getloadavg()[0]:.2f}", flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="mor-llamacpp-") if args.workdir is None else None
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    llama_types = [t for t in args.llama.split(",") if t]
    files, fbytes = {}, {}
    for ft in llama_types:
        files[ft] = workdir / f"mor-vanilla-{ft}.gguf"
        fbytes[ft] = write_gguf(model, files[ft], ft)

    # ---- correctness: llama.cpp logits vs model(ids), every prompt position
    check_ids = torch.randint(3, cfg.vocab_size, (32,), generator=g).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([check_ids])).logits[0].float().numpy()
    verify = {}
    for ft, f32_kv in [(ft, False) for ft in llama_types] + ([("f32", True)] if "f32" in llama_types else []):
        llm = load_llama(files[ft], args.threads, 64, logits_all=True, f32_kv=f32_kv)
        got = llama_logits(llm, check_ids)
        del llm
        diff = np.abs(got - ref)
        ft = ft + " (f32 KV)" if f32_kv else ft
        verify[ft] = {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
                      "max_abs_logit": float(np.abs(ref).max()),
                      "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())}
        print(f"verify llama.cpp {ft:14s} vs torch fp32, 32 positions: max |dlogit| {diff.max():.2e} "
              f"(mean {diff.mean():.2e}, max |logit| {np.abs(ref).max():.2f}), argmax agreement "
              f"{verify[ft]['argmax_agreement']:.3f}", flush=True)

    # ---- contenders (each built once, reused across rounds)
    contenders = {}
    for ft in llama_types:
        contenders[f"llama.cpp {ft}"] = ("llama", load_llama(files[ft], args.threads, n_ctx), fbytes[ft])
    for v in [v for v in args.ours.split(",") if v]:
        eng = make_engine(model, v, n_ctx)
        if v == "fp32-kernels" and not eng.cpu_kernels:
            print("warning: the CPU kernels are not available; fp32-kernels runs on PyTorch ops", flush=True)
        print(f"mor {v}: decode on the CPU kernels: {eng.cpu_kernels}", flush=True)
        contenders[f"mor {v}"] = ("mor", eng, engine_weight_bytes(eng, v))
    for name, (kind, obj, _) in contenders.items():  # warm-up (excluded)
        (llama_decode if kind == "llama" else ours_decode)(obj, prompt, 8)

    results = {name: [] for name in contenders}
    for r in range(args.rounds):
        for name, (kind, obj, _) in contenders.items():
            res = (llama_decode if kind == "llama" else ours_decode)(obj, prompt, args.tokens)
            results[name].append(res)
        print(f"round {r + 1}/{args.rounds} decode tok/s: " + ", ".join(
            f"{n} {(args.tokens - 1) / rs[-1]['decode_s']:.0f}" for n, rs in results.items()), flush=True)

    ref_tokens = results["mor fp32-kernels"][0]["tokens"] if "mor fp32-kernels" in results else None
    rows = {}
    for name, rs in results.items():
        best = min(rs, key=lambda x: x["decode_s"])
        tok_s = (args.tokens - 1) / best["decode_s"]
        e2e = args.tokens / min(x["total_s"] for x in rs)
        internal = [x["internal_decode_tok_s"] for x in rs if x["internal_decode_tok_s"]]
        rows[name] = {"decode_tok_s": tok_s,
                      "median_decode_tok_s": float(np.median([(args.tokens - 1) / x["decode_s"] for x in rs])), "e2e_tok_s": e2e, "ms_per_token": 1e3 / tok_s,
                      "weight_bytes": contenders[name][2], "gb_s": contenders[name][2] * tok_s / 1e9,
                      "internal_decode_tok_s": max(internal) if internal else None,
                      "all_decode_tok_s": [(args.tokens - 1) / x["decode_s"] for x in rs],
                      "same_tokens_as_mor_fp32": (agreement(best["tokens"], ref_tokens) if ref_tokens else None)}
    pairs = [("mor fp32-kernels", "llama.cpp f32"), ("mor fp32-torch", "llama.cpp f32"),
             ("mor bf16-weights", "llama.cpp f16"), ("mor bf16", "llama.cpp f16"), ("mor fp16", "llama.cpp f16"),
             ("mor int8", "llama.cpp q8_0"),
             ("mor fp32-kernels", "llama.cpp q8_0")]
    ratios = {f"{a} / {b}": rows[a]["decode_tok_s"] / rows[b]["decode_tok_s"]
              for a, b in pairs if a in rows and b in rows}

    print(f"\nbatch-1 greedy decode, {args.tokens} new tokens after a {args.prompt_len}-token prompt, "
          f"{args.threads} thread(s), best of {args.rounds}")
    print(f"{'contender':22s} {'decode tok/s':>12s} {'median':>7s} {'ms/tok':>7s} {'e2e tok/s':>9s} {'weights MB':>10s} "
          f"{'GB/s':>6s} {'llama internal':>14s} {'agree':>6s}")
    for name, row in rows.items():
        internal = f"{row['internal_decode_tok_s']:.0f}" if row["internal_decode_tok_s"] else "-"
        agree = f"{row['same_tokens_as_mor_fp32']}" if row["same_tokens_as_mor_fp32"] is not None else "-"
        print(f"{name:22s} {row['decode_tok_s']:12.1f} {row['median_decode_tok_s']:7.1f} {row['ms_per_token']:7.2f} {row['e2e_tok_s']:9.1f} "
              f"{row['weight_bytes'] / 1e6:10.1f} {row['gb_s']:6.1f} {internal:>14s} {agree:>6s}")
    print("agree: length of the common prefix of the greedy tokens with mor fp32-kernels' "
          f"(of {args.tokens})")
    for k, v in ratios.items():
        print(f"ratio decode tok/s  {k:40s} {v:.3f}  (llama.cpp is {1 / v:.2f}x ours)")

    if tmp is not None:
        tmp.cleanup()
    summary = {"threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "load_avg_end": os.getloadavg()[0], "tokens": args.tokens, "prompt_len": args.prompt_len, "rounds": args.rounds,
               "model": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "ff": cfg.intermediate_size,
                         "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                         "head_dim": cfg.head_dim, "vocab": cfg.vocab_size, "tied": cfg.tie_word_embeddings},
               "verify": verify, "results": rows, "ratios": ratios,
               "versions": {"llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
                            "python": platform.python_version()}}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
