"""CombinedMarginLoss inside PartialFC_V2 against a plain re-statement of arcface_torch's semantics.

The reference (`upstream_loss_and_cos_grad`) is written from what arcface_torch's CombinedMarginLoss and
DistCrossEntropy do, in plain python loops over float64 numbers:
- ArcFace branch (m1 == 1 and m3 == 0): the target cosine becomes cos(acos(t) + m2), computed under no_grad,
  so every logit's derivative with respect to its cosine is s (straight-through); no threshold, no easy margin;
- m3 > 0 branch: the target becomes t - m3 (m1 and m2 are not read);
- interclass filtering: non-target cosines above the threshold become 0 and get no gradient;
- cross-entropy: -log(max(p_target, 1e-30)) averaged over the batch, gradient s * (softmax - one_hot) / batch.
Its gradient with respect to the cosines is chained to embeddings and centres through normalize / matmul by
autograd, which is not what is under test.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from arcface.errors import ConfigError
from arcface.losses import CombinedMarginLoss
from arcface.partial_fc import PartialFC_V2

S = 64.0
UPSTREAM_CLAMP = 1e-30


def upstream_target(t, m1, m2, m3):
    """arcface_torch's new target value for one target cosine."""
    if m1 == 1.0 and m3 == 0.0:
        return math.cos(math.acos(t) + m2)
    if m3 > 0:
        return t - m3
    raise AssertionError(f"arcface_torch raises for margins {(m1, m2, m3)}")


def combined_target(t, m1, m2, m3):
    """The formula our head applies for every triple."""
    return math.cos(m1 * math.acos(t) + m2) - m3


def upstream_loss_and_cos_grad(cos, labels, target_fn, threshold=0.0):
    """(loss, d loss / d cos as nested lists, smallest target probability) by plain loops."""
    batch, classes = len(cos), len(cos[0])
    loss, smallest = 0.0, 1.0
    grad = [[0.0] * classes for _ in range(batch)]
    for i in range(batch):
        y = labels[i]
        logits, has_grad = [], []
        for j in range(classes):
            c = cos[i][j]
            filtered = threshold > 0 and j != y and c > threshold
            if filtered:
                c = 0.0
            if j == y:
                c = target_fn(c)
            logits.append(S * c)
            has_grad.append(not filtered)
        top = max(logits)
        exps = [math.exp(z - top) for z in logits]
        total = sum(exps)
        probs = [e / total for e in exps]
        smallest = min(smallest, probs[y])
        loss += -math.log(max(probs[y], UPSTREAM_CLAMP)) / batch
        for j in range(classes):
            if has_grad[j]:
                grad[i][j] = S * (probs[j] - (1.0 if j == y else 0.0)) / batch
    return loss, grad, smallest


def reference(emb, weight, labels, target_fn, threshold=0.0):
    """Loss and gradients (embeddings, centres) of the plain reference, in float64."""
    e = emb.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    cos = F.normalize(e) @ F.normalize(w).t()
    loss, grad, smallest = upstream_loss_and_cos_grad(cos.tolist(), labels.tolist(), target_fn, threshold)
    cos.backward(torch.tensor(grad, dtype=torch.float64))
    return loss, e.grad, w.grad, smallest


def ours(emb, weight, labels, margins, threshold=0.0, **head_kwargs):
    e = emb.detach().clone().requires_grad_(True)
    pfc = PartialFC_V2(CombinedMarginLoss(S, *margins, threshold, **head_kwargs), emb.shape[1], weight.shape[0])
    with torch.no_grad():
        pfc.weight.copy_(weight)
    loss = pfc(e, labels)
    loss.backward()
    return float(loss.detach()), e.grad, pfc.weight.grad


def make_batch(seed, batch=12, dim=16, classes=30, pull=0.4):
    """Embeddings pulled towards their centre, so that the target probabilities stay above upstream's clamp."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (batch,), generator=g)
    emb = pull * F.normalize(weight[labels]) + (1 - pull) * F.normalize(torch.randn(batch, dim, generator=g))
    return emb, weight, labels


def max_rel_diff(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


UPSTREAM_CASES = {
    "arcface": ((1.0, 0.5, 0.0), 0.0),
    "cosface": ((1.0, 0.0, 0.4), 0.0),
    "arcface_filtered": ((1.0, 0.5, 0.0), 0.3),
    "cosface_filtered": ((1.0, 0.0, 0.4), 0.3),
    "plain_softmax": ((1.0, 0.0, 0.0), 0.0),
}


@pytest.mark.parametrize("case", list(UPSTREAM_CASES))
def test_partial_fc_loss_and_gradients_equal_upstream(case):
    margins, threshold = UPSTREAM_CASES[case]
    for seed in range(3):
        emb, weight, labels = make_batch(seed)
        ref_loss, ref_ge, ref_gw, smallest = reference(emb, weight, labels,
                                                       lambda t: upstream_target(t, *margins), threshold)
        # where upstream's clamp bites its loss is capped; these batches stay where it does not
        assert smallest > UPSTREAM_CLAMP
        loss, ge, gw = ours(emb, weight, labels, margins, threshold)
        # float32: a sample's loss is a difference of logits of size s, so it carries a rounding of a few
        # s * 2**-24; at these losses (2 to 30) that is within 2e-6 relative
        assert math.isclose(loss, ref_loss, rel_tol=2e-6)
        assert max_rel_diff(ge, ref_ge) < 1e-5
        assert max_rel_diff(gw, ref_gw) < 1e-5


@pytest.mark.parametrize("margins", [(1.0, 0.3, 0.2), (0.9, 0.4, 0.15), (0.9, 0.4, 0.0), (1.2, 0.0, 0.0)])
def test_combined_margins_use_the_full_formula_with_upstreams_gradient_rule(margins):
    """Upstream has no combined margin (it drops m1, m2 when m3 > 0 and raises otherwise); ours applies
    cos(m1*theta + m2) - m3 with the same straight-through gradient as its ArcFace and CosFace."""
    emb, weight, labels = make_batch(5)
    ref_loss, ref_ge, ref_gw, smallest = reference(emb, weight, labels, lambda t: combined_target(t, *margins))
    assert smallest > UPSTREAM_CLAMP
    loss, ge, gw = ours(emb, weight, labels, margins)
    assert math.isclose(loss, ref_loss, rel_tol=2e-6)
    assert max_rel_diff(ge, ref_ge) < 1e-5
    assert max_rel_diff(gw, ref_gw) < 1e-5
    if margins[2] > 0:  # what arcface_torch would have trained instead
        cosface_loss = reference(emb, weight, labels, lambda t: upstream_target(t, 1.0, 0.0, margins[2]))[0]
        assert abs(cosface_loss - loss) > 0.1


def test_exact_gradient_mode_is_the_derivative_of_the_margin():
    """'exact': autograd through the textbook margin; the result differs from upstream's gradient."""
    emb, weight, labels = make_batch(7)
    for margins in [(1.0, 0.5, 0.0), (0.9, 0.4, 0.15)]:
        e = emb.detach().double().requires_grad_(True)
        w = weight.detach().double().requires_grad_(True)
        cos = F.normalize(e) @ F.normalize(w).t()
        theta = torch.acos(cos[torch.arange(len(labels)), labels])
        target = torch.cos(margins[0] * theta + margins[1]) - margins[2]
        logits = cos.index_put((torch.arange(len(labels)), labels), target) * S
        F.cross_entropy(logits, labels).backward()
        loss, ge, gw = ours(emb, weight, labels, margins, margin_gradient="exact")
        assert max_rel_diff(ge, e.grad) < 1e-4 and max_rel_diff(gw, w.grad) < 1e-4
        _, st_ge, _ = ours(emb, weight, labels, margins)
        assert max_rel_diff(st_ge, e.grad) > 0.05


def test_target_derivative_in_each_mode():
    """d(new target)/d(cos) on the target logit: 1 straight-through; sin(theta + m)/sin(theta) exact,
    negative once theta + m passes pi (cos < cos(pi - 0.5) = -0.8776)."""
    cos = torch.tensor([[-0.95, -0.9, -0.85, 0.0, 0.5, 0.99]]).repeat(6, 1)
    labels = torch.arange(6)
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    for mode in ("straight_through", "exact"):
        x = cos.clone().requires_grad_(True)
        out = CombinedMarginLoss(S, 1.0, 0.5, 0.0, margin_gradient=mode)(x, labels)
        target_grad = torch.autograd.grad(out[labels, labels].sum(), x, retain_graph=True)[0]
        slope = (target_grad[labels, labels] / S).tolist()
        for c, got in zip(cos[0].tolist(), slope):
            theta = math.acos(c)
            expect = 1.0 if mode == "straight_through" else math.sin(theta + 0.5) / math.sin(theta)
            assert got == pytest.approx(expect, rel=1e-4, abs=1e-5)
        if mode == "exact":
            assert slope[0] < 0 and slope[1] < 0 and slope[2] > 0
        # the other logits are only scaled: slope s, in both modes
        assert torch.all(target_grad[off_diagonal] == 0)
        assert torch.all(torch.autograd.grad(out.sum(), x)[0][off_diagonal] == S)


def test_head_values_equal_upstream_arccos_form_and_skip_other_shards():
    g = torch.Generator().manual_seed(1)
    cos = torch.rand(5, 7, generator=g) * 2 - 1
    labels = torch.tensor([0, 3, -1, 6, 2])
    for mode in ("straight_through", "exact"):
        out = CombinedMarginLoss(S, 1.0, 0.5, 0.0, margin_gradient=mode)(cos.clone(), labels)
        expect = cos.clone()
        for i, y in enumerate(labels.tolist()):
            if y >= 0:
                expect[i, y] = math.cos(math.acos(float(cos[i, y])) + 0.5)
        assert torch.allclose(out, expect * S, atol=1e-4)
        assert torch.equal(out[2], cos[2] * S)


def test_interclass_filtering_zeroes_high_non_target_logits():
    cos = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.7, 0.45], [0.6, 0.1, 0.3]])
    labels = torch.tensor([0, 1, -1])
    out = CombinedMarginLoss(1.0, 1.0, 0.0, 0.0, interclass_filtering_threshold=0.4)(cos, labels)
    expect = torch.tensor([[0.9, 0.0, 0.1], [0.2, 0.7, 0.0], [0.0, 0.1, 0.3]])
    assert torch.allclose(out, expect)


def test_where_upstreams_clamp_bites_ours_is_exact_and_gradients_agree():
    """A sample whose target probability is below 1e-30: upstream's loss is capped at -log(1e-30) = 69.08 for
    it, ours is the true -log p; the gradients are the same in both."""
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    emb = torch.tensor([[-1.0, 0.05], [0.0, 1.0]])  # sample 0 points away from its class 0
    labels = torch.tensor([0, 1])
    ref_loss, ref_ge, ref_gw, smallest = reference(emb, weight, labels, lambda t: upstream_target(t, 1.0, 0.5, 0.0))
    assert smallest < UPSTREAM_CLAMP
    loss, ge, gw = ours(emb, weight, labels, (1.0, 0.5, 0.0))
    # exact per-sample losses: log-sum-exp of the logits minus the target logit, by hand
    cos = (F.normalize(emb.double()) @ F.normalize(weight.double()).t()).tolist()
    exact = 0.0
    for i, y in enumerate(labels.tolist()):
        z = [S * (upstream_target(c, 1.0, 0.5, 0.0) if j == y else c) for j, c in enumerate(cos[i])]
        top = max(z)
        exact += (top + math.log(sum(math.exp(v - top) for v in z)) - z[y]) / len(labels)
    assert loss == pytest.approx(exact, rel=1e-6)
    assert loss > ref_loss + 1.0
    assert max_rel_diff(ge, ref_ge) < 1e-5 and max_rel_diff(gw, ref_gw) < 1e-5


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ConfigError, match="margin_gradient must be one of 'straight_through', 'exact', got 'st'"):
        CombinedMarginLoss(S, 1.0, 0.5, 0.0, margin_gradient="st")
    with pytest.raises(ConfigError, match="margin scale s must be > 0"):
        CombinedMarginLoss(0, 1.0, 0.5, 0.0)
