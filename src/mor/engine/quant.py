"""Opt-in low-precision decode weights (issue 17): ``Engine(..., decode_precision=...)``.

fp32 stays the exact default. The options make a *copy* of the model for the engine (the
caller's model is untouched):

* ``"bf16"`` / ``"fp16"``: every parameter in that dtype (the KV cache follows);
* ``"bf16-weights"``: the matrix weights of the decoder layers (attention and MLP projections)
  and the LM head rounded to bf16 values, everything else (activations, norms, routers, K/V)
  fp32. The copy stays fp32 for PyTorch; the CPU kernels (``mor.engine.kernels``) read exact
  bf16 copies of those weights, half the bytes of fp32 (the batch-1 decode speed-up);
* ``"int8"``: weight-only int8 for the linear layers of the decoder layers (attention and
  MLP projections): per-output-channel symmetric scales, ``w ~= scale[o] * q[o, i]`` with
  ``q`` in [-127, 127]; activations, norms, routers, embedding and LM head stay in the
  model's dtype. On CPU the product of fp32 activations runs on the compiled kernels'
  int8 ``linear`` (``mor.engine.kernels``; any number of rows, prefill included) unless the
  copy was made with ``cpu_kernels=False`` (``Engine(cpu_kernels=False)``), else as
  ``torch._weight_int8pack_mm`` (50x slower here at 512 rows); elsewhere as a dequantised
  matmul.

``decode_accuracy`` measures what a choice costs on given token sequences: the mean NLL of
the next token under the original and the low-precision model (teacher forcing,
``routing="threshold"``), the share of positions whose argmax agrees (greedy agreement) and
the largest logit difference relative to the logits' scale.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn import functional

from . import kernels

DECODE_PRECISIONS = ("bf16", "fp16", "int8", "bf16-weights")


def matrix_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, name, layer) for the linear layers whose weights low-precision decode changes:
    every decoder layer's attention and MLP projections (``bf16-weights`` adds the LM head)."""
    return [(parent, name, child) for layer in model.model.layers for parent in (layer.self_attn, layer.mlp)
            for name, child in parent.named_children() if isinstance(child, nn.Linear)]


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights and one fp32 scale per output channel.
    ``use_kernels``: on CPU with fp32 activations (and no gradient to track), multiply on the
    compiled CPU kernels when they are available (else ``torch._weight_int8pack_mm``)."""

    def __init__(self, weight_q: torch.Tensor, scale: torch.Tensor, use_kernels: bool = True):
        super().__init__()
        self.use_kernels = use_kernels
        self.in_features, self.out_features = weight_q.shape[1], weight_q.shape[0]
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("scale", scale)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        if lin.bias is not None:
            raise ValueError("Int8Linear quantises bias-free linear layers only")
        w = lin.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q, scale.to(lin.weight.dtype))

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, (out, in) in the scale's dtype."""
        return self.weight_q.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if (self.use_kernels and x.device.type == "cpu" and x.dtype == torch.float32
                and self.scale.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad)
                and kernels.load() is not None):
            y = kernels.linear(x2.contiguous(), self.weight_q.contiguous(), scale=self.scale.contiguous())
        elif x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight_q, self.scale.to(x.dtype))
        else:
            y = functional.linear(x2, self.weight_q.to(x.dtype)) * self.scale.to(x.dtype)
        return y.reshape(*shape, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def low_precision_copy(model: nn.Module, precision: str, cpu_kernels: bool = True) -> nn.Module:
    """A copy of ``model`` with ``precision`` decode weights (module docstring).
    ``cpu_kernels=False``: its int8 layers multiply with PyTorch ops only."""
    if precision not in DECODE_PRECISIONS:
        raise ValueError(f"decode_precision={precision!r} is not valid; choose one of: "
                         f"{', '.join(DECODE_PRECISIONS)} (or None for the model's own weights)")
    m = copy.deepcopy(model).eval()
    m.decode_precision = precision  # what the copy holds (the engine reads it: bf16-weights kernels)
    if precision == "bf16":
        return m.to(torch.bfloat16)
    if precision == "fp16":
        return m.to(torch.float16)
    if precision == "bf16-weights":
        with torch.no_grad():
            for lin in [c for _, _, c in matrix_linears(m)] + [m.lm_head]:
                lin.weight.copy_(lin.weight.to(torch.bfloat16).to(lin.weight.dtype))
        return m
    for parent, name, child in matrix_linears(m):
        q = Int8Linear.from_linear(child)
        q.use_kernels = cpu_kernels
        setattr(parent, name, q)
    return m


@torch.no_grad()
def decode_accuracy(model: nn.Module, low: nn.Module, ids: torch.Tensor) -> dict:
    """NLL of the next token (original vs low precision), greedy (argmax) agreement and the
    largest logit error relative to the largest |logit|, on sequences ``ids`` (B, T)."""
    ref = model(ids, routing="threshold").logits.float()[:, :-1]
    got = low(ids, routing="threshold").logits.float()[:, :-1]
    target = ids[:, 1:]

    def nll(lg):
        return float(functional.cross_entropy(lg.reshape(-1, lg.size(-1)), target.reshape(-1)))

    return {"nll": nll(ref), "nll_low": nll(got), "greedy_agreement": float((ref.argmax(-1) == got.argmax(-1))
                                                                            .float().mean()),
            "max_logit_error": float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-12))}
