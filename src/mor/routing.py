"""Routers and the routing math of SPEC.md sections 3-4, as small pure functions.

Everything here is independent of the model so that tests can check it against
hand-computed values. The model's forward and the inference runner both route and combine
through these functions (``token_choice``, ``continues``, ``combine``), so the rule has
one definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional


@dataclass
class RouterRecord:
    """One recursion's routing, collected by the model's forward when asked (``records=``):
    per batch row, candidate positions, their router scores and which were selected (all
    (B, K) tensors; padding entries are False in ``valid``).

    ``scores``: expert-choice - sigmoid of the decision router's logit (the probability the
    BCE trains; the threshold rule selects scores > 0.5); token-choice - the router's
    probability of depth ``recursion``, and ``selected`` marks the tokens assigned that depth."""
    recursion: int  # 1-based
    positions: torch.Tensor
    scores: torch.Tensor
    selected: torch.Tensor
    valid: torch.Tensor


class Router(nn.Module):
    """Linear d->out (no bias), or an MLP d->h->out with GELU (h = 2d, or 8d for "wide_mlp")."""

    def __init__(self, hidden_size: int, out_features: int, arch: str = "linear"):
        super().__init__()
        self.arch = arch
        if arch == "linear":
            self.net = nn.Linear(hidden_size, out_features, bias=False)
        else:
            inner = 2 * hidden_size * (4 if arch == "wide_mlp" else 1)
            self.net = nn.Sequential(
                nn.Linear(hidden_size, inner, bias=False),
                nn.GELU(),
                nn.Linear(inner, out_features, bias=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def gate_scores(logits: torch.Tensor, func: str, alpha: float) -> torch.Tensor:
    """Router weight g: alpha applied AFTER the activation (SPEC section 3)."""
    if func == "sigmoid":
        return alpha * torch.sigmoid(logits)
    if func == "tanh":
        return alpha * torch.tanh(logits)
    if func == "softmax":
        return alpha * torch.softmax(logits, dim=-1)
    raise ValueError(f"router_func={func!r}; choose one of: sigmoid, tanh, softmax")


def router_probs(logits: torch.Tensor, func: str) -> torch.Tensor:
    """Normalised router probabilities (no alpha), used by the balancing loss and entropy."""
    return torch.softmax(logits, dim=-1) if func == "softmax" else torch.sigmoid(logits)


def token_choice(logits: torch.Tensor, func: str, alpha: float, bias: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-choice assignment from the router's logits (..., N_r) on H^1 (SPEC section 4).

    Returns (probs, choice, gate): the probabilities, the chosen depth minus one (argmax of
    probabilities + the loss-free balancing bias, which enters only here) and the router
    weight g (..., 1) of the chosen depth."""
    probs = router_probs(logits, func)
    choice = torch.argmax(probs + bias, dim=-1)
    gate = gate_scores(logits, func, alpha).gather(-1, choice[..., None])
    return probs, choice, gate


def continues(decision_logits, capacity: float):
    """The causal expert-choice rule: a candidate runs the recursion iff its (decision)
    router logit is > 0 (sigmoid > 0.5), or always when the capacity is 1. Takes and returns
    a tensor, or a NumPy array (the engine's decode step decides on the host)."""
    if capacity >= 1.0:
        if isinstance(decision_logits, torch.Tensor):
            return torch.ones_like(decision_logits, dtype=torch.bool)
        return np.ones(np.shape(decision_logits), dtype=bool)
    return decision_logits > 0


def combine(cfg, h: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None,
            is_last: torch.Tensor | None = None, h_first: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden state of a token after it ran a recursion: h entered it, y = block(h) is the
    shared block's output (with its own residual stream), gate the router weight g (broadcast
    against h). SPEC sections 3-4 and the paper's equations 2.1 / 2.2:

    * recursive, or ``gate_combine="pass_through"``: y;
    * expert-choice: h + g * y;
    * token-choice: at the token's last recursion (``is_last``) H^1 + g * y with H^1 =
      ``h_first``; before it y, or g * y with ``gate_every_recursion`` (equation 2.2)."""
    if cfg.architecture == "recursive" or cfg.gate_combine == "pass_through":
        return y
    if cfg.router_type == "expert":
        return h + gate * y
    before_last = gate * y if cfg.gate_every_recursion else y
    return torch.where(is_last, h_first + gate * y, before_last)


def num_selected(capacity: float, seq_len: int) -> int:
    """k_r = max(1, int(c_r * T))."""
    return max(1, int(capacity * seq_len))


def warmup_capacity(capacity: float, step: int, warmup_steps: int) -> float:
    """Cosine warm-up from 1 to ``capacity`` over ``warmup_steps`` optimizer steps."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return capacity
    return capacity + (1.0 - capacity) * 0.5 * (1.0 + math.cos(math.pi * step / warmup_steps))


def bce_selection_loss(logits: torch.Tensor, selected: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy on raw router logits: target 1 for selected candidates, 0 otherwise,
    averaged over the (valid) candidates."""
    target = selected.to(logits.dtype)
    loss = functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if valid is None:
        return loss.mean()
    v = valid.to(loss.dtype)
    return (loss * v).sum() / v.sum().clamp_min(1.0)


def z_loss(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss: mean of logsumexp(logits)^2 over the last dim (a logit^2 for one-score routers)."""
    z = torch.logsumexp(logits, dim=-1) ** 2
    if valid is None:
        return z.mean()
    v = valid.to(z.dtype)
    return (z * v).sum() / v.sum().clamp_min(1.0)


def balancing_loss(probs: torch.Tensor, assignment: torch.Tensor, num_experts: int) -> torch.Tensor:
    """sum_i f_i * P_i with f_i = N * (fraction of tokens assigned to i), P_i = mean prob of i.

    probs: (..., N) router probabilities; assignment: (...) chosen index."""
    probs = probs.reshape(-1, num_experts)
    counts = torch.bincount(assignment.reshape(-1), minlength=num_experts).to(probs.dtype)
    f = num_experts * counts / counts.sum()
    p = probs.mean(dim=0)
    return (f * p).sum()


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = max_i (load_i - mean load) / mean load."""
    load = load.float()
    mean = load.mean()
    return (load.max() - mean) / mean.clamp_min(1e-9)


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of Bernoulli(sigmoid(logits)), elementwise."""
    p = torch.sigmoid(logits)
    return functional.binary_cross_entropy_with_logits(logits, p, reduction="none")


def categorical_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of categorical distributions along the last dim."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def pack_mask(mask: torch.Tensor, pad_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the True positions of a (B, T) mask to the left, in sequence order.

    Returns idx (B, K) with K = max row count, padded with ``pad_index``, and valid (B, K).
    Vectorised: a stable sort of the mask, no loop over rows."""
    counts = mask.sum(dim=1)
    k = int(counts.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :k]
    valid = torch.arange(k, device=mask.device)[None, :] < counts[:, None]
    idx = torch.where(valid, order, torch.full_like(order, pad_index))
    return idx, valid
