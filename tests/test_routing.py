"""Routing math against hand-computed values."""

import math

import torch

from mor import routing


def test_balancing_loss_and_maxvio_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]])
    assign = torch.tensor([0, 1, 2, 0])
    # f = 3 * [2/4, 1/4, 1/4]; P = column means [0.425, 0.4, 0.175]
    want = 1.5 * 0.425 + 0.75 * 0.4 + 0.75 * 0.175
    assert math.isclose(routing.balancing_loss(probs, assign, 3).item(), want, rel_tol=1e-6)
    assert math.isclose(routing.max_violation(torch.tensor([2.0, 1.0, 1.0])).item(), 0.5, rel_tol=1e-6)
    assert routing.max_violation(torch.tensor([5.0, 5.0])).item() == 0.0


def test_gate_alpha_after_activation():
    x = torch.tensor([0.0, 2.0])
    assert torch.allclose(routing.gate_scores(x, "sigmoid", 0.1), 0.1 * torch.sigmoid(x))
    assert torch.allclose(routing.gate_scores(x, "tanh", 0.1), 0.1 * torch.tanh(x))
    assert torch.allclose(routing.gate_scores(x, "softmax", 1.0), torch.softmax(x, -1))


def test_capacity_and_warmup():
    assert routing.num_selected(1 / 3, 10) == 3 and routing.num_selected(0.01, 10) == 1 and routing.num_selected(1.0, 7) == 7
    assert routing.warmup_capacity(0.5, 0, 100) == 1.0
    assert math.isclose(routing.warmup_capacity(0.5, 50, 100), 0.75)
    assert routing.warmup_capacity(0.5, 100, 100) == 0.5 and routing.warmup_capacity(0.5, 3, 0) == 0.5


def test_bce_zloss_entropy():
    lg = torch.tensor([[2.0, -1.0, 0.5]])
    sel = torch.tensor([[True, False, False]])
    want = -(math.log(1 / (1 + math.exp(-2))) + math.log(1 - 1 / (1 + math.exp(1))) + math.log(1 - 1 / (1 + math.exp(-0.5)))) / 3
    assert math.isclose(routing.bce_selection_loss(lg, sel).item(), want, rel_tol=1e-6)
    valid = torch.tensor([[True, True, False]])
    want2 = -(math.log(1 / (1 + math.exp(-2))) + math.log(1 - 1 / (1 + math.exp(1)))) / 2
    assert math.isclose(routing.bce_selection_loss(lg, sel, valid).item(), want2, rel_tol=1e-6)
    assert math.isclose(routing.z_loss(lg[..., None]).item(), (4 + 1 + 0.25) / 3, rel_tol=1e-6)
    assert math.isclose(routing.binary_entropy(torch.tensor(0.0)).item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(routing.categorical_entropy(torch.full((4,), 0.25)).item(), math.log(4), rel_tol=1e-6)


def test_pack_mask():
    m = torch.tensor([[True, False, True, True], [False, False, True, False], [False] * 4])
    idx, valid = routing.pack_mask(m, pad_index=9)
    assert idx.tolist() == [[0, 2, 3], [2, 9, 9], [9, 9, 9]]
    assert valid.tolist() == [[True] * 3, [True, False, False], [False] * 3]


def test_combine_follows_the_paper_equations():
    """Equation 2.1 (expert-choice) and 2.2 (token-choice) by hand, h = 1, y = f(h) = 10, g = 0.5."""
    from mor import ModelConfig
    from mor.routing import combine
    h, y, g, h1 = torch.tensor([1.0]), torch.tensor([10.0]), torch.tensor([0.5]), torch.tensor([100.0])
    last, before = torch.tensor([True]), torch.tensor([False])
    assert combine(ModelConfig(), h, y, g).item() == 1 + 5
    assert combine(ModelConfig(gate_combine="pass_through"), h, y, g).item() == 10
    assert combine(ModelConfig(architecture="recursive"), h, y).item() == 10
    tok = ModelConfig(router_type="token")
    assert combine(tok, h, y, g, last, h1).item() == 100 + 5  # H^1 + g f(H^i)
    assert combine(tok, h, y, g, before, h1).item() == 10  # released code: f(H^r)
    paper = ModelConfig(router_type="token", gate_every_recursion=True)
    assert combine(paper, h, y, g, before, h1).item() == 5  # equation 2.2: g f(H^r), no H^r added
    assert combine(paper, h, y, g, last, h1).item() == 100 + 5
