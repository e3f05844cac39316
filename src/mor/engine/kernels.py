"""CPU decode kernels (issue 17): matrix products that stream weights at memory speed on all
threads, fused RMSNorm / RoPE / SiLU-gate, and attention that reads the paged K/V cache in
place.

Why: on CPU, PyTorch's fp32 ``F.linear`` with a few rows streams weights at a fraction of the
memory bandwidth and does not use a second thread, and a decoder layer written in PyTorch
costs ~250 small ops (each a few microseconds) plus a copy of every cache block it reads.
``cpu_kernels.c`` runs one decoder layer's decode-step arithmetic in one call
(``mor_decode_layers``: a run of decoder layers in one call, each layer's weights held by
:class:`DecodeLayer`), called by the engine's decode calls with their host work
(:func:`decode_rows`: gathers, paged-cache addressing, the state update; and
:func:`route_rows`: expert-choice routing and the gate); ``linear``, ``linear_silu_mul``,
``rms_norm``, ``rope_``, ``kv_write`` and ``paged_attention`` expose its parts (the LM head
uses ``linear``; the tests check each part against PyTorch). Weights in fp32,
bf16 or int8 (with per-row scales). Every output element is computed by the same operations
whatever the batch, its tile and the thread count, so a token's result does not depend on
the batch it shares (bit-exact), and differs from PyTorch's only by fp32 rounding order.

The source ships with the package and is compiled on first use with the system C compiler
(``$CC``, split like a shell command, else cc / gcc / clang; ``-O3 -march=native -fopenmp``,
then fewer flags) into ``$MOR_KERNEL_CACHE`` (default ``~/.cache/mor/kernels``), keyed by a
hash of the source, the whole command, the compiler's version and the CPU's feature flags;
the build is atomic (temporary directory + rename), so concurrent first uses are safe.
``load()`` returns None with the reason in ``unavailable_reason()`` when there is no
compiler or the build fails; ``MOR_CPU_KERNELS=0`` turns them off. The engine falls back to
PyTorch then.

Threads: each call uses ``torch.get_num_threads()`` threads (one OpenMP runtime: the library
links the ``libgomp`` PyTorch already loaded).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import threading
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])
EXTRA_FLAGS = ["-shared", "-fPIC", "-ffp-contract=fast", "-Wno-psabi"]  # every build (part of the cache key)
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False
_load_lock = threading.Lock()

_p, _i64, _int, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "mor_linear": ([_p, _i64, _i64, _p, _int, _p, _i64, _p, _p, _int], None),
    "mor_linear_silu_mul": ([_p, _i64, _i64, _p, _p, _int, _p, _p, _i64, _p, _int], None),
    "mor_rms_norm": ([_p, _i64, _i64, _p, _f32, _p], None),
    "mor_rope": ([_p, _i64, _i64, _i64, _p, _p], None),
    "mor_kv_write": ([_p, _p, _i64, _i64, _p, _p, _p], None),
    "mor_paged_attention": ([_p, _i64, _i64, _i64, _i64, _p, _p, _i64, _p, _i64, _i64, _p, _f32, _p, _int], None),
    "mor_sample": ([_p, _i64, _i64, _p, _p, _p, _int], None),
    "mor_profile": ([_int], None),
    "mor_profile_take": ([_p], None),
    "mor_decode_rows": ([_p, _i64, _p, _p, _p, _i64, _p, _p, _i64, _i64, _i64, _i64, _i64, _i64, _p, _p, _i64, _p, _p,
                         _i64, _i64, _i64, _i64, _p, _p, _i64, _p, _p, _i64, _p, _p, _i64, _int, _p, _p, _p, _int], _int),
    "mor_route_rows": ([_p, _i64, _p, _i64, _i64, _p, _i64, _p, _p, _int, _f32, _p, _p], _int),
    "mor_decode_rows_packed": ([_p], _int),
    "mor_decode_step": ([_p, _p, _f32, _f32, _p], _int),
    "mor_decode_step_args": ([], ctypes.c_char_p),
    "mor_decode_step_nargs": ([], _i64),
    "mor_route_rows_packed": ([_p, _f32], _int),
}
MAX_BLOCK_SIZE, MAX_HEAD_DIM = 256, 512  # the attention kernel's stack buffers


def cache_dir() -> Path:
    return Path(os.environ.get("MOR_KERNEL_CACHE") or Path.home() / ".cache" / "mor" / "kernels")


def _compiler() -> list[str] | None:
    """The compiler command: ``$CC`` (split like a shell word list, e.g. "ccache gcc"; its
    program must exist when set), else cc / gcc / clang on the PATH."""
    cc = os.environ.get("CC")
    if cc:
        words = shlex.split(cc)
        found = shutil.which(words[0]) if words else None
        if found is None:
            raise RuntimeError(f"$CC={cc!r} is not an executable on the PATH")
        return [found, *words[1:]]
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


@functools.lru_cache(maxsize=None)
def _build_key(cc: tuple[str, ...]) -> str:
    """What a compiled library depends on besides the source and flags: the compiler (path and
    version) and this CPU (``-march=native``: its feature flags)."""
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return "\n".join([" ".join(cc), version.splitlines()[0] if version else "", os.uname().machine, cpu])


def build(force: bool = False) -> Path:
    """Compile ``cpu_kernels.c`` (cached) and return the shared library's path. Raises
    RuntimeError naming the compiler and its complaint when no flag set builds."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc / clang)")
    src = SOURCE.read_bytes()  # compiled from these bytes (a copy), so the key matches the code
    machine = _build_key(tuple(cc)).encode()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(src + b"\0" + " ".join(flags + EXTRA_FLAGS).encode() + b"\0" + machine).hexdigest()
        out = cache_dir() / f"cpu_kernels-{key[:16]}.so"
        if out.exists() and not force:
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
            c_file, so_file = Path(tmp) / "cpu_kernels.c", Path(tmp) / "cpu_kernels.so"
            c_file.write_bytes(src)
            cmd = [*cc, *flags, *EXTRA_FLAGS, str(c_file), "-o", str(so_file), "-lm"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if r.returncode == 0 and so_file.exists():
                os.replace(so_file, out)
                return out
            errors.append(f"{' '.join(flags)}: exit {r.returncode} {r.stderr.strip()[-400:]}")
    raise RuntimeError(f"{' '.join(cc)} could not build {SOURCE.name}: " + " | ".join(errors))


def _open(path: Path) -> ctypes.CDLL:
    """The library at ``path`` with every kernel's signature set (AttributeError if one is missing)."""
    lib = ctypes.CDLL(str(path))
    for name, (args, res) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None (``unavailable_reason()`` says why). Built once per process."""
    global _lib, _reason, _tried
    if _tried:
        return _lib
    with _load_lock:
        if _tried:
            return _lib
        if os.environ.get("MOR_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
            _reason = "disabled by MOR_CPU_KERNELS"
        else:
            try:
                try:
                    lib = _open(build())
                except (OSError, AttributeError):  # a damaged cached library: build it again, once
                    lib = _open(build(force=True))
                _lib = lib
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
                _reason = f"{type(e).__name__}: {e}"
        _tried = True
    return _lib


def unavailable_reason() -> str | None:
    load()
    return _reason


def available() -> bool:
    return load() is not None


# ---------------------------------------------------------------- tensor-level wrappers
# Inputs must be contiguous fp32 CPU tensors (checked by the caller, the engine runner, once).

def _threads() -> int:
    return torch.get_num_threads()


WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.int8)  # matrix weights the kernels read (codes 0, 1, 2)


def _wt(w: torch.Tensor, scale: torch.Tensor | None = None) -> int:
    """The kernels' weight-type code of ``w``; int8 weights need their fp32 per-row ``scale``."""
    if w.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"CPU kernel weights must be float32, bfloat16 or int8, not {w.dtype}")
    code = WEIGHT_DTYPES.index(w.dtype)
    if (code == 2) != (scale is not None):
        raise ValueError("int8 weights need a per-row scale (and only int8 weights take one)")
    if scale is not None and (scale.dtype != torch.float32 or scale.shape != (w.shape[0],)
                              or not scale.is_contiguous()):
        raise ValueError(f"the int8 scale must be a contiguous fp32 ({w.shape[0]},) tensor")
    return code


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def linear(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None,
           scale: torch.Tensor | None = None) -> torch.Tensor:
    """``[residual +] x @ w.T`` for x (M, I) fp32, w (O, I) fp32 or bf16 (widened exactly), or
    int8 with its per-row ``scale`` (``scale[o] * <x, q_o>``)."""
    M, I = x.shape
    O = w.shape[0]
    y = torch.empty(M, O, dtype=torch.float32)
    _lib.mor_linear(x.data_ptr(), M, I, w.data_ptr(), _wt(w, scale), _ptr(scale), O, y.data_ptr(),
                    _ptr(residual), _threads())
    return y


def linear_silu_mul(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, scale_gate: torch.Tensor | None = None,
                    scale_up: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x @ w_gate.T) * (x @ w_up.T)`` (weights of one type; int8 with their scales)."""
    M, I = x.shape
    O = w_gate.shape[0]
    code = _wt(w_gate, scale_gate)
    if _wt(w_up, scale_up) != code:
        raise ValueError("gate and up weights must share a type")
    y = torch.empty(M, O, dtype=torch.float32)
    _lib.mor_linear_silu_mul(x.data_ptr(), M, I, w_gate.data_ptr(), w_up.data_ptr(), code, _ptr(scale_gate),
                             _ptr(scale_up), O, y.data_ptr(), _threads())
    return y


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    M, D = x.shape
    y = torch.empty(M, D, dtype=torch.float32)
    _lib.mor_rms_norm(x.data_ptr(), M, D, w.data_ptr(), eps, y.data_ptr())
    return y


def rope_(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in place on x (M, heads * hd) with per-row cos/sin (M, hd)."""
    M, hd = cos.shape
    _lib.mor_rope(x.data_ptr(), M, heads, hd, cos.data_ptr(), sin.data_ptr())
    return x


def kv_write(k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor) -> None:
    """Store K/V (N, width) at physical cache rows ``rows`` (N,) int64."""
    N, width = k.shape
    _lib.mor_kv_write(k.data_ptr(), v.data_ptr(), N, width, rows.data_ptr(), k_cache.data_ptr(),
                      v_cache.data_ptr())


def paged_attention(q: torch.Tensor, heads: int, kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    blocks: torch.Tensor, layer: int, qidx: torch.Tensor, out: torch.Tensor) -> None:
    """Decode attention for q (M, heads * hd): row m attends to its keys 0..qidx[m], found through
    ``blocks[m, :, layer]`` (blocks (M, nb, layers) int64, contiguous) in the caches
    (num_blocks, block_size, kv_heads, hd). Writes ``out`` (M, heads * hd)."""
    M = q.shape[0]
    bs, hd = k_cache.shape[1], k_cache.shape[3]
    if bs > MAX_BLOCK_SIZE or hd > MAX_HEAD_DIM:
        raise ValueError(f"paged_attention needs block_size <= {MAX_BLOCK_SIZE} and head_dim <= {MAX_HEAD_DIM} "
                         f"(got {bs}, {hd})")
    nb, layers = blocks.shape[1], blocks.shape[2]
    _lib.mor_paged_attention(q.data_ptr(), M, heads, kv_heads, hd, k_cache.data_ptr(), v_cache.data_ptr(), bs,
                             blocks.data_ptr() + 8 * layer, nb * layers, layers, qidx.data_ptr(),
                             hd ** -0.5, out.data_ptr(), _threads())


def _library() -> ctypes.CDLL:
    """The loaded kernels (RuntimeError naming why they are unavailable)."""
    lib = load()
    if lib is None:
        raise RuntimeError(f"CPU kernels unavailable: {unavailable_reason()}")
    return lib


def sample(logits: torch.Tensor, temps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` (M, V) fp32: the first largest logit where ``temps[m]``
    is <= 0, else a draw from ``softmax(logits[m] / temps[m])`` by inverse CDF with the uniform
    number ``u[m]`` (clamped to [0, 1)); -1 where ``temps[m]`` is NaN (row skipped). A row with a
    NaN logit gets its first NaN (as ``torch.argmax``). temps, u: (M,). A row's token depends
    only on that row, its temperature and its ``u``."""
    lib = _library()
    if logits.dim() != 2 or not logits.is_contiguous() or logits.dtype != torch.float32 or logits.device.type != "cpu":
        raise ValueError("sample needs contiguous fp32 CPU logits (M, V)")
    M, V = logits.shape
    temps, u = temps.float().contiguous(), u.float().contiguous()
    if temps.shape != (M,) or u.shape != (M,):
        raise ValueError(f"temps and u must have shape ({M},), got {tuple(temps.shape)} and {tuple(u.shape)}")
    out = torch.empty(M, dtype=torch.int64)
    if M and V:
        lib.mor_sample(logits.data_ptr(), M, V, temps.data_ptr(), u.data_ptr(), out.data_ptr(), _threads())
    return out


def weight_copy(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w`` as the kernels read it: itself (fp32), or a bf16 copy whose values must already be
    bf16-representable (the "bf16-weights" model copy rounds them), so the copy is exact."""
    w = w.detach()
    if dtype == torch.float32:
        return w
    c = w.to(dtype).contiguous()
    if not torch.equal(c.float(), w):
        raise ValueError("weights are not bf16 values: round them first (decode_precision='bf16-weights')")
    return c


def projections(layer) -> tuple:
    """A decoder layer's seven projections in the order ``mor_decode_layers`` takes them."""
    at, mlp = layer.self_attn, layer.mlp
    return at.q_proj, at.k_proj, at.v_proj, at.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj


class DecodeLayer:
    """One decoder layer's weights as ``mor_decode_layers`` reads them (one token per row: the
    whole layer in one call, its phases split across threads inside one parallel region):
    ``row``, the layer's entry of a weights table (``LAYER_ROW`` int64: the norm and matrix
    addresses, the int8 scales' table, the weight type, the epsilon's fp32 bits). Matrix weights
    are read in ``weight_dtype`` (fp32, or bf16 copies of bf16-valued weights), or as int8 with
    their scales (``Int8Linear``). Whether a layer suits the kernels at all (fp32 contiguous
    norms, one epsilon, one kind of projection) is ``runner.kernel_obstacle``'s question, asked
    before this is built."""

    def __init__(self, layer, cfg, weight_dtype: torch.dtype = torch.float32):
        mods = projections(layer)
        if all(hasattr(m, "weight_q") for m in mods):  # weight-only int8 (mor.engine.quant.Int8Linear)
            mats = [m.weight_q.detach() for m in mods]
            self.scales = [m.scale.detach() for m in mods]
        else:
            mats = [weight_copy(m.weight, weight_dtype) for m in mods]
            self.scales = None
        self.wbf = _wt(mats[0], None if self.scales is None else self.scales[0])
        self._scale_table = (None if self.scales is None
                             else torch.tensor([t.data_ptr() for t in self.scales], dtype=torch.int64))
        self.tensors = (layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(), *mats)
        self.eps = float(layer.input_layernorm.eps)
        eps_bits = int(torch.tensor([self.eps], dtype=torch.float32).view(torch.int32).item())
        self.row = [t.data_ptr() for t in self.tensors] + [_ptr(self._scale_table) or 0, self.wbf, eps_bits]
        self.dims = LayerDims(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                              cfg.num_key_value_heads, cfg.head_dim)


LAYER_ROW = 12  # int64 entries per layer in a weights table (cpu_kernels.c)


class LayerDims(tuple):
    """(D, F, H, KV, hd): hidden size, FFN size, query heads, K/V heads, head size."""

    def __new__(cls, D: int, F: int, H: int, KV: int, hd: int):
        return super().__new__(cls, (D, F, H, KV, hd))

    def rows_work_floats(self, M: int, layers: int) -> int:
        """Scratch floats ``decode_rows`` needs for M rows and a run of ``layers`` layers (its
        float part, rounded up to an even count, then M * (layers + 6) int64)."""
        D, F, H, KV, hd = self
        floats = M * (2 * D + (H + 2 * KV) * hd + H * hd + F) + M * (3 * D + 2 * hd)
        return floats + (floats & 1) + 2 * M * (max(layers, 1) + 6)


# the rows of the per-token integer table ``decode_rows`` reads (one column per token)
ROW_FIELDS = ("slot", "position", "write_group", "write_index", "read_group", "query_index", "token")
MODES = {"out": 0, "store": 1, "gated": 2}


DECODE_ROWS_ERRORS = {
    1: "a slot outside the pool's sequences", 2: "a position outside the RoPE tables",
    3: "a token outside the embedding", 4: "a write group or entry outside the block tables",
    5: "a KV write outside the blocks a sequence owns (ensure() was not called)",
    6: "a read group or query index outside the block tables",
    7: "layers outside the block tables' layers",
}


def _check(t: torch.Tensor | None, name: str, shape: tuple, dtype=torch.float32) -> None:
    """``t`` (if given) is a contiguous CPU tensor of ``dtype`` and ``shape`` (None: any size).
    Runs ~30 times per decode step, so written as plain comparisons (0.4 us a call)."""
    if t is None:
        return
    have = t.shape
    ok = t.dtype == dtype and t.is_cpu and len(have) == len(shape) and t.is_contiguous()
    if ok:
        for n, m in zip(shape, have):
            if n is not None and n != m:
                ok = False
                break
    if not ok:
        raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor of shape {shape} (None: any), "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device.type}")


class DecodeRows:
    """The engine's decode calls (``mor_decode_layers`` on one token per row, with the gathers,
    the paged-cache addressing and the residual update done in C), with the operands that stay
    fixed for an engine's life bound and checked once: the in-flight state, the RoPE tables, the
    pool's block tables and K/V tensors, the embedding and the expert-choice gate. A call then
    checks its own operands, fills ~20 fields of a packed int64 argument array and makes one
    foreign call (``mor_decode_rows_packed``): about 4 us of host work, against 14 us for
    checking and passing all 37 arguments each time. The bound tensors must stay as they are
    (their storage is addressed directly): the runner owns them for the engine's life.

    ``state`` (slots + 1, D) fp32, the in-flight hidden states (row ``slots``: a scratch row);
    ``cos_tab`` / ``sin_tab`` (positions, hd); ``blocks``: the pool's C-contiguous (groups,
    slots, blocks per slot, layers) int64 block tables; ``k_cache`` / ``v_cache`` (rows, block
    size, KV, hd); ``embed`` (V, D) and ``gate`` (slots + 1,) fp32 when calls use them."""

    def __init__(self, dims: "LayerDims", state: torch.Tensor, cos_tab: torch.Tensor, sin_tab: torch.Tensor,
                 blocks: np.ndarray, k_cache: torch.Tensor, v_cache: torch.Tensor, embed: torch.Tensor | None = None,
                 gate: torch.Tensor | None = None):
        lib = _library()
        D, F, H, KV, hd = dims
        if not (isinstance(blocks, np.ndarray) and blocks.dtype == np.int64 and blocks.flags.c_contiguous
                and blocks.ndim == 4):
            raise ValueError("blocks must be the pool's C-contiguous int64 (groups, slots, blocks, layers) array")
        G, S, MB, ML = blocks.shape
        _check(state, "state", (None, D))
        _check(embed, "embed", (None, D))
        _check(gate, "gate", (state.shape[0],))
        _check(cos_tab, "cos_tab", (None, hd))
        _check(sin_tab, "sin_tab", tuple(cos_tab.shape))
        _check(k_cache, "k_cache", (None, None, KV, hd))
        _check(v_cache, "v_cache", tuple(k_cache.shape))
        if state.shape[0] < S + 1:
            raise ValueError(f"state needs {S + 1} rows (has {state.shape[0]})")
        self.dims, self.layers_per_group = dims, ML
        self._held = (state, cos_tab, sin_tab, blocks, k_cache, v_cache, embed, gate)
        self._embed, self._gate = _ptr(embed) or 0, _ptr(gate) or 0
        self._V = 0 if embed is None else embed.shape[0]
        self.work = torch.empty(0, dtype=torch.float32)  # grown on demand when a call brings none
        self._args = args = (ctypes.c_int64 * 37)()
        self._addr = ctypes.addressof(args)
        self._fn = lib.mor_decode_rows_packed
        fixed = {6: state.data_ptr(), 9: D, 10: F, 11: H, 12: KV, 13: hd, 14: cos_tab.data_ptr(),
                 15: sin_tab.data_ptr(), 16: cos_tab.shape[0], 18: blocks.ctypes.data, 19: G, 20: S, 21: MB, 22: ML,
                 29: k_cache.data_ptr(), 30: v_cache.data_ptr(), 31: k_cache.shape[1]}
        for i, v in fixed.items():
            args[i] = v

    def __call__(self, table: torch.Tensor, ints: np.ndarray, a: int, b: int, n_write: int, j0: int, mode: str,
                 x: torch.Tensor | None = None, embed: bool = False,
                 work: torch.Tensor | None = None) -> torch.Tensor | None:
        """The layers of ``table`` (``DecodeLayer.row`` entries, (layers, LAYER_ROW) int64; none:
        the input passes through), layer j0 + l of their cache group, on tokens a..b-1 of
        ``ints``, a C-contiguous int64 NumPy array (len(ROW_FIELDS), N), one column per token.

        Token m's input is ``x[m - a]`` (x given), else the embedding of its token (``embed``),
        else ``state[slot]``; its RoPE is row ``position`` of the tables. The first ``n_write``
        tokens store layer l's K/V at entry ``write_index`` of cache group ``write_group`` of
        their slot; every token attends to entries 0..``query_index`` of group ``read_group``.
        ``mode``: "out" returns y (b - a, D); "store" writes y to ``state[slot]``; "gated"
        writes ``input + gate[slot] * y`` there (the expert-choice update) and returns None.
        ``work``: 1-D fp32 scratch of >= ``dims.rows_work_floats(b - a, layers)`` floats (default:
        this object's own). Every index is checked (in C) before anything is written: ValueError
        naming the first bad one, RuntimeError for a write into a block the sequence does not own."""
        M, nl = b - a, table.shape[0]
        if not (isinstance(ints, np.ndarray) and ints.dtype == np.int64 and ints.flags.c_contiguous
                and ints.ndim == 2 and ints.shape[0] == len(ROW_FIELDS) and 0 <= a <= b <= ints.shape[1]):
            raise ValueError(f"ints must be a C-contiguous int64 ({len(ROW_FIELDS)}, N) array and 0 <= a <= b <= N")
        code = MODES.get(mode)
        if code is None or not 0 <= n_write <= M or (code == 2 and not self._gate) or (embed and not self._embed):
            raise ValueError(f"decode_rows: n_write={n_write} for {M} rows, mode={mode!r} (one of "
                             f"{', '.join(MODES)}; 'gated' needs a gate, embed an embedding)")
        _check(table, "table", (nl, LAYER_ROW), torch.int64)
        if j0 < 0 or j0 + nl > self.layers_per_group:
            raise ValueError(f"layers j0..j0+{nl} must lie within the {self.layers_per_group} of a cache group")
        need = self.dims.rows_work_floats(M, nl)
        if work is None:
            if self.work.numel() < need:
                self.work = torch.empty(need, dtype=torch.float32)
            work = self.work
        else:
            _check(work, "work", (None,))
            if work.numel() < need:
                raise ValueError(f"work holds {work.numel()} floats, {need} needed")
        out = torch.empty(M, self.dims[0], dtype=torch.float32) if code == 0 else None
        if M == 0:
            return out
        if x is not None:
            _check(x, "x", (M, self.dims[0]))
        N, base = ints.shape[1], ints.ctypes.data + 8 * a
        args = self._args
        args[0], args[1], args[2] = table.data_ptr(), nl, 0 if x is None else x.data_ptr()
        args[3], args[5] = (self._embed, self._V) if embed else (0, 0)
        args[4], args[7], args[17] = base + 48 * N, base, base + 8 * N
        args[23], args[24], args[26], args[27] = base + 16 * N, base + 24 * N, base + 32 * N, base + 40 * N
        args[8], args[25], args[28], args[32] = M, n_write, j0, code
        args[33] = self._gate if code == 2 else 0
        args[34] = 0 if out is None else out.data_ptr()
        args[35], args[36] = work.data_ptr(), torch.get_num_threads()
        err = self._fn(self._addr)
        if err:
            raise (RuntimeError if err == 5 else ValueError)(f"decode_rows: {DECODE_ROWS_ERRORS[err]}")
        return out


def decode_rows(table: torch.Tensor, dims: LayerDims, ints, a: int, b: int, n_write: int, state: torch.Tensor,
                cos_tab: torch.Tensor, sin_tab: torch.Tensor, blocks, k_cache: torch.Tensor, v_cache: torch.Tensor,
                j0: int, work: torch.Tensor, mode: str, x: torch.Tensor | None = None,
                embed: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor | None:
    """One :class:`DecodeRows` call with every operand given (``embed`` / ``gate``: tensors, a
    gate exactly for ``mode="gated"``); the engine binds the fixed ones once instead."""
    if (mode == "gated") != (gate is not None):
        raise ValueError(f"decode_rows: mode={mode!r} (one of {', '.join(MODES)}; a gate exactly for 'gated')")
    call = DecodeRows(dims, state, cos_tab, sin_tab, blocks, k_cache, v_cache, embed=embed, gate=gate)
    return call(table, ints, a, b, n_write, j0, mode, x=x, embed=embed is not None, work=work)


ROUTER_FUNCS = {"sigmoid": 1, "tanh": 2, "softmax": 3}


def router_table(linears) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``route_rows``' table of one-output linear routers: int64 rows [weight address, bias
    address or 0, input width], and the tensors it points to (keep them alive while the table is
    used). The addresses are those of the parameters now (in-place updates are seen, replaced
    ones not). ValueError for a router that is not a one-output fp32 linear layer with
    contiguous parameters."""
    held, rows = [], []
    for lin in linears:
        w = lin.weight.detach()
        b = None if lin.bias is None else lin.bias.detach()
        if not (w.dim() == 2 and w.shape[0] == 1 and (b is None or b.shape == (1,))
                and all(t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() for t in [w] + [b] * (b is not None))):
            raise ValueError(f"router_table needs one-output fp32 linear layers with contiguous CPU parameters, "
                             f"got weight {w.dtype} {tuple(w.shape)}")
        held += [w] if b is None else [w, b]
        rows.append([w.data_ptr(), 0 if b is None else b.data_ptr(), w.shape[1]])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3), held


ROUTE_ROWS_ERRORS = {1: "a slot outside the state", 2: "a router index outside the table",
                     3: "a router whose width is not the state's"}


class RouteRows:
    """Expert-choice routing of tokens in ``state[slots]`` (``mor_route_rows``), with the state,
    the routers (a ``router_table``), the router function, alpha and the gate bound and checked
    once; a call passes its three index arrays in a packed argument array (one foreign call).
    ``func``: the router function ("sigmoid", "tanh", "softmax"), or None for no gate."""

    def __init__(self, state: torch.Tensor, routers: torch.Tensor, func: str | None, alpha: float,
                 gate: torch.Tensor | None):
        lib = _library()
        _check(state, "state", (None, None))
        _check(routers, "routers", (None, 3), torch.int64)
        if func:
            if func not in ROUTER_FUNCS:
                raise ValueError(f"route_rows: func={func!r}, expected one of {', '.join(ROUTER_FUNCS)} or None")
            if gate is None:
                raise ValueError("route_rows: a gate tensor is needed with a router function")
            _check(gate, "gate", (state.shape[0],))
        self._held = (state, routers, gate)
        self._alpha = float(alpha)
        self._fn = lib.mor_route_rows_packed
        self._args = args = (ctypes.c_int64 * 12)()
        self._addr = ctypes.addressof(args)
        args[0], args[1], args[4] = state.data_ptr(), state.shape[0], state.shape[1]
        args[5], args[6] = routers.data_ptr(), routers.shape[0]
        args[9], args[11] = (ROUTER_FUNCS[func], gate.data_ptr()) if func else (0, 0)

    def __call__(self, slots, dec_idx, gate_idx) -> np.ndarray:
        """The decision logits (router ``dec_idx[m]``'s; fp32 NumPy), and with a router function
        ``gate[slot] = alpha * func(logit of router gate_idx[m])``. slots / dec_idx / gate_idx:
        int64 arrays. Every index is checked (in C) before anything is written: ValueError
        naming the first bad one."""
        slots, dec_idx, gate_idx = (v if type(v) is np.ndarray and v.dtype == np.int64 and v.flags.c_contiguous
                                    else np.ascontiguousarray(v, dtype=np.int64) for v in (slots, dec_idx, gate_idx))
        M = len(slots)
        if not len(dec_idx) == len(gate_idx) == M:
            raise ValueError(f"route_rows: {M} slots, {len(dec_idx)} decision and {len(gate_idx)} gate router indices")
        decision = np.empty(M, dtype=np.float32)
        if M:
            args = self._args
            args[2], args[3], args[7], args[8] = slots.ctypes.data, M, dec_idx.ctypes.data, gate_idx.ctypes.data
            args[10] = decision.ctypes.data
            err = self._fn(self._addr, self._alpha)
            if err:
                raise ValueError(f"route_rows: {ROUTE_ROWS_ERRORS[err]}")
        return decision


def route_rows(state: torch.Tensor, slots, routers: torch.Tensor, dec_idx, gate_idx, func: str | None, alpha: float,
               gate: torch.Tensor | None):
    """One :class:`RouteRows` call with every operand given (the engine binds them once)."""
    return RouteRows(state, routers, func, alpha, gate)(slots, dec_idx, gate_idx)


STEP_ERRORS = {20: "a block call whose cache writers are not its first rows",
               21: "more tokens than the step's capacity",
               22: "a slot outside the state, or a running recursion outside the model's"}


class DecodeStep:
    """The engine's whole decode step on the kernels in one call (``mor_decode_step``): enter
    (embedding + prefix layers), decide, the shared block (once, or until every token left with
    the sequence schedule), decide, and finish (suffix layers, final RMSNorm, LM head) for the
    tokens that leave - the same ``DecodeRows`` / ``RouteRows`` calls on the same rows in the same
    order as the runner's Python path, so the results are bit-identical; the host work between
    them (row tables, cache indices, decisions, the leaving tokens' order) runs in C.

    Bound once: ``rows`` (a :class:`DecodeRows`), ``route`` (a :class:`RouteRows`, or None where no
    token is routed: vanilla, recursive), the weights tables of the prefix, shared-block and
    suffix layers, the recursions' write / read cache groups and whether each needs a decision,
    the ``full`` group (-1: none), the block's mode ("store" or "gated"), the offset of the
    decision routers in the routers' table, the pool's token counts ``lens`` and the runner's
    ``written`` counts ((groups, slots) int64, the latter updated in place), the embedding and
    gate, the final norm and the LM head. ``capacity``: the most tokens a step holds (slots)."""

    def __init__(self, rows: DecodeRows, route: RouteRows | None, prefix: torch.Tensor, block: torch.Tensor,
                 suffix: torch.Tensor, suffix_j0: int, rec_write: np.ndarray, rec_read: np.ndarray,
                 needs_decision: np.ndarray, full: int, block_mode: str, decision_offset: int, lens: np.ndarray,
                 written: np.ndarray, embed: torch.Tensor, gate: torch.Tensor | None, norm_w: torch.Tensor,
                 eps: float, lm_head: torch.Tensor, capacity: int):
        lib = _library()
        names = lib.mor_decode_step_args().decode().split(",")
        if len(names) != lib.mor_decode_step_nargs() or names != list(self.ARGS):
            raise RuntimeError("cpu_kernels.c and kernels.DecodeStep disagree on the step's arguments")
        D = rows.dims[0]
        nr = len(rec_write)
        G, S = lens.shape
        for name, t, shape in [("prefix", prefix, (None, LAYER_ROW)), ("block", block, (None, LAYER_ROW)),
                               ("suffix", suffix, (None, LAYER_ROW))]:
            _check(t, name, shape, torch.int64)
        _check(embed, "embed", (None, D))
        _check(norm_w, "norm_w", (D,))
        _check(gate, "gate", (S + 1,))
        if not (lm_head.dim() == 2 and lm_head.shape[1] == D and lm_head.is_contiguous() and lm_head.is_cpu):
            raise ValueError(f"DecodeStep: the LM head must be a contiguous CPU (vocab, {D}) matrix, "
                             f"got {tuple(lm_head.shape)}")
        arrays = [np.ascontiguousarray(a, dtype=np.int64) for a in (rec_write, rec_read, needs_decision)]
        rec_write, rec_read, needs_decision = arrays
        if not (len(rec_read) == nr and len(needs_decision) >= nr + 1 and np.all((rec_write >= -1) & (rec_write < G))
                and np.all((rec_read >= 0) & (rec_read < G)) and -1 <= full < G):
            raise ValueError("DecodeStep: cache groups outside the pool's, or tables of different lengths")
        if not (isinstance(written, np.ndarray) and written.dtype == np.int64 and written.flags.c_contiguous
                and written.shape == (G, S) and lens.dtype == np.int64 and lens.flags.c_contiguous):
            raise ValueError("DecodeStep: lens and written must be C-contiguous int64 (groups, slots) arrays")
        ML = rows.layers_per_group
        if not (max(prefix.shape[0], block.shape[0]) <= ML and 0 <= suffix_j0 and suffix_j0 + suffix.shape[0] <= ML):
            raise ValueError(f"DecodeStep: prefix / block / suffix layers ({prefix.shape[0]}, {block.shape[0]}, "
                             f"{suffix_j0}+{suffix.shape[0]}) outside the block tables' {ML} layers")
        if block_mode not in ("store", "gated") or (block_mode == "gated" and gate is None) or capacity > S:
            raise ValueError(f"DecodeStep: block_mode={block_mode!r} (store, or gated with a gate), "
                             f"capacity {capacity} <= {S} slots")
        self.rows, self.capacity, self.num_slots = rows, capacity, S
        self._alpha = route._alpha if route is not None else 0.0
        self._eps = float(eps)
        self._max_layers = max(prefix.shape[0], block.shape[0], suffix.shape[0], 1)
        cap, V = capacity, lm_head.shape[0]
        self.vocab = V
        self._iwork = np.empty(16 * cap, dtype=np.int64)
        # 64-byte aligned pieces: decisions (cap), final hidden states and their norm (cap x D each)
        self._fwork = torch.empty(-(-cap // 16) * 16 + 2 * (-(-cap * D // 16) * 16), dtype=torch.float32)
        if self._fwork.data_ptr() % 64:
            raise RuntimeError("DecodeStep: the scratch buffer must be 64-byte aligned")
        self.exit_slots, self.exit_depths = np.empty(cap, dtype=np.int64), np.empty(cap, dtype=np.int64)
        self.next_slots, self.next_recs = np.empty(cap, dtype=np.int64), np.empty(cap, dtype=np.int64)
        self.block_recs = np.empty(cap * max(nr, 1), dtype=np.int64)
        self.pass_rows = np.empty(max(nr, 1), dtype=np.int64)
        self.counts = np.zeros(3, dtype=np.int64)
        self._held = (prefix, block, suffix, arrays, lens, written, embed, gate, norm_w, lm_head)
        self._fn = lib.mor_decode_step
        self._rr = None if route is None else route._addr
        self._args = args = (ctypes.c_int64 * len(self.ARGS))()
        self._addr = ctypes.addressof(args)
        fixed = dict(prefix=prefix.data_ptr(), n_prefix=prefix.shape[0], block=block.data_ptr(),
                     n_block=block.shape[0], suffix=suffix.data_ptr(), n_suffix=suffix.shape[0], suffix_j0=suffix_j0,
                     num_recursions=nr, rec_write=rec_write.ctypes.data, rec_read=rec_read.ctypes.data,
                     needs_decision=needs_decision.ctypes.data, full=full, block_mode=MODES[block_mode],
                     decision_offset=decision_offset, lens=lens.ctypes.data, written=written.ctypes.data,
                     num_slots=S, embed=embed.data_ptr(), vocab_in=embed.shape[0], gate=_ptr(gate) or 0,
                     norm_w=norm_w.data_ptr(), lm_head=lm_head.data_ptr(), lm_type=_wt(lm_head), vocab=V,
                     capacity=cap, iwork=self._iwork.ctypes.data, fwork=self._fwork.data_ptr(),
                     exit_slots=self.exit_slots.ctypes.data, exit_depths=self.exit_depths.ctypes.data,
                     next_slots=self.next_slots.ctypes.data, next_recs=self.next_recs.ctypes.data,
                     block_recs=self.block_recs.ctypes.data, pass_rows=self.pass_rows.ctypes.data,
                     counts=self.counts.ctypes.data)
        for name, value in fixed.items():
            args[self.ARGS.index(name)] = value

    ARGS = ("prefix", "n_prefix", "block", "n_block", "suffix", "n_suffix", "suffix_j0", "num_recursions",
            "rec_write", "rec_read", "needs_decision", "full", "block_mode", "decision_offset", "lens", "written",
            "num_slots", "embed", "vocab_in", "gate", "norm_w", "lm_head", "lm_type", "vocab", "sequence", "tokens",
            "positions", "n_enter", "enter", "n_run", "run", "run_recs", "capacity", "iwork", "fwork", "dwork",
            "logits", "exit_slots", "exit_depths", "next_slots", "next_recs", "block_recs", "pass_rows", "counts",
            "phases", "threads")
    _PER_CALL = tuple(map(ARGS.index, ("sequence", "tokens", "positions", "n_enter", "enter", "n_run", "run",
                                       "run_recs", "dwork", "logits", "phases", "threads")))

    def __call__(self, enter: np.ndarray, run: np.ndarray, run_recs: np.ndarray, tokens: np.ndarray,
                 positions: np.ndarray, sequence: bool = False, phases: np.ndarray | None = None):
        """One step: ``enter`` slots (sorted) whose token (``tokens[slot]``, at
        ``positions[slot]``) enters; ``run`` slots whose token runs recursion ``run_recs[i]``
        next (sorted by recursion >= 1, then slot). ``phases``: a float64 (3,) array that the
        step adds its enter / block / finish seconds to. Returns (exit slots, exit depths,
        logits (exits, V) fp32, next slots, next recursions, each block call's recursions); the
        logits are the first rows of a buffer sized for every token of the step.

        Bad slots or recursions, or more tokens than the capacity: ValueError before anything
        is changed. An error inside a call (a bad position or token, a write into a block the
        sequence does not own) stops the step where it occurs, the earlier calls' updates done."""
        S = self.num_slots
        for a in (enter, run, run_recs, tokens, positions):
            if not (type(a) is np.ndarray and a.dtype == np.int64 and a.flags.c_contiguous and a.ndim == 1):
                raise ValueError("DecodeStep: slots, recursions, tokens and positions must be 1-D int64 arrays")
        if len(run) != len(run_recs) or len(tokens) < S or len(positions) < S:
            raise ValueError(f"DecodeStep: {len(run)} running slots with {len(run_recs)} recursions; tokens and "
                             f"positions need {S} entries")
        if phases is not None and not (type(phases) is np.ndarray and phases.dtype == np.float64
                                       and phases.shape == (3,) and phases.flags.c_contiguous):
            raise ValueError("DecodeStep: phases must be a contiguous float64 (3,) array")
        n = len(enter) + len(run)
        if n > self.capacity:
            raise ValueError(f"DecodeStep: {n} tokens in a step of capacity {self.capacity}")
        need = self.rows.dims.rows_work_floats(n, self._max_layers)
        if self.rows.work.numel() < need:
            self.rows.work = torch.empty(need, dtype=torch.float32)
        logits = torch.empty(n, self.vocab, dtype=torch.float32)
        args = self._args
        i = self._PER_CALL
        args[i[0]], args[i[1]], args[i[2]] = int(sequence), tokens.ctypes.data, positions.ctypes.data
        args[i[3]], args[i[4]], args[i[5]], args[i[6]] = len(enter), enter.ctypes.data, len(run), run.ctypes.data
        args[i[7]], args[i[8]], args[i[9]] = run_recs.ctypes.data, self.rows.work.data_ptr(), logits.data_ptr()
        args[i[10]], args[i[11]] = 0 if phases is None else phases.ctypes.data, torch.get_num_threads()
        err = self._fn(self.rows._addr, self._rr, self._alpha, self._eps, self._addr)
        if err:
            message = (STEP_ERRORS.get(err) or DECODE_ROWS_ERRORS.get(err)
                       or ROUTE_ROWS_ERRORS.get(err - 10, f"error {err}"))
            raise (RuntimeError if err == 5 else ValueError)(f"decode step: {message}")
        n_exit, n_next, n_pass = self.counts.tolist()
        recs = self.block_recs
        bounds = np.cumsum(self.pass_rows[:n_pass]).tolist()
        block_recs = [recs[a:b].copy() for a, b in zip([0] + bounds[:-1], bounds)]
        return (self.exit_slots[:n_exit].copy(), self.exit_depths[:n_exit].copy(), logits[:n_exit],
                self.next_slots[:n_next].copy(), self.next_recs[:n_next].copy(), block_recs)


# ---------------------------------------------------------------- profiling counters
# the C side's phase clocks (mor.engine.profile reads them): the phases of one decoder layer
# (each including the wait for the slowest thread) and standalone ``linear`` calls (LM head)
PROFILE_PHASES = ("norm", "qkv", "rope_kv_write", "attention", "o_proj", "norm2", "gate_up", "down", "linear")
PHASE_KIND = {"norm": "other_ops", "norm2": "other_ops", "rope_kv_write": "kv_copy", "attention": "attention",
              "qkv": "matmul", "o_proj": "matmul", "gate_up": "matmul", "down": "matmul", "linear": "matmul"}


def set_profiling(on: bool) -> None:
    """Start (and zero) or stop the kernels' phase clocks."""
    if load() is not None:
        take_profile()
        _lib.mor_profile(1 if on else 0)


def take_profile() -> dict[str, float]:
    """Seconds per ``PROFILE_PHASES`` entry since the last call (the clocks restart)."""
    if load() is None:
        return {k: 0.0 for k in PROFILE_PHASES}
    buf = (ctypes.c_double * len(PROFILE_PHASES))()
    _lib.mor_profile_take(ctypes.addressof(buf))
    return dict(zip(PROFILE_PHASES, buf))
