"""Margin heads for Partial FC: (cosine logits, labels with -1 for classes of other shards) -> scaled logits.

CombinedMarginLoss(s, m1, m2, m3) replaces each sample's target cosine cos(theta) by cos(m1*theta + m2) - m3 and
multiplies every logit by s: ArcFace is (1, 0.5, 0), CosFace (1, 0, 0.4).

How the margin is differentiated is a choice (`margin_gradient`):

- 'straight_through' (the default, arcface_torch's): the margin moves the target's value but not its derivative,
  d(new target)/d(cos theta) = 1. arcface_torch computes ArcFace's angle shift under no_grad, and CosFace's shift
  has slope 1 anyway, so every margin it trains has this gradient; ours does too, bit for bit up to rounding.
- 'exact': the derivative of cos(m1*theta + m2) itself, m1*sin(m1*theta + m2)/sin(theta). For ArcFace 0.5 it
  changes sign below cos(theta) = cos(pi - 0.5) = -0.878 (the shifted angle has passed pi, so pushing the sample
  towards its centre lowers the target) and grows like 1/sin(theta) as cos(theta) -> 1 (340 at 1 - 1e-6,
  about 1400 at the last float32 below 1). It is the gradient of the loss as written (insightface#2309).

Where we part from arcface_torch on purpose: its CombinedMarginLoss only knows two cases, ArcFace (m1 == 1 and
m3 == 0) and "m3 > 0", where it subtracts m3 and silently ignores m1 and m2; any other triple raises a bare
RuntimeError. Here every triple means cos(m1*theta + m2) - m3. No upstream config uses a combined triple, so
upstream configs train identically. Neither version clips ArcFace when theta + m2 passes pi (arcface_torch's
`theta` / `sinmm` / `easy_margin` attributes are left over from an older head and are never read).
"""
import math

import torch

from .errors import ConfigError

MARGIN_GRADIENTS = ("straight_through", "exact")


class CombinedMarginLoss(torch.nn.Module):
    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0, margin_gradient="straight_through"):
        super().__init__()
        self.s = float(s)
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        if self.s <= 0:
            raise ConfigError(f"margin scale s must be > 0, got {s}")
        if margin_gradient not in MARGIN_GRADIENTS:
            raise ConfigError(f"margin_gradient must be one of {', '.join(map(repr, MARGIN_GRADIENTS))}, "
                              f"got {margin_gradient!r}")
        self.margin_gradient = margin_gradient

    def extra_repr(self):
        return (f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
                f"filter={self.interclass_filtering_threshold}, margin_gradient={self.margin_gradient}")

    @property
    def is_additive_only(self):
        """CosFace-like triples: the new target is cos - m3, whose derivative is 1 in both gradient modes."""
        return self.m1 == 1.0 and self.m2 == 0.0

    def margin_value(self, cos):
        """cos(m1 * acos(cos) + m2) - m3, for values only (no attention paid to its derivative)."""
        if self.is_additive_only:
            return cos - self.m3
        return torch.cos(self.m1 * torch.acos(cos) + self.m2) - self.m3

    def margin_exact(self, cos):
        """The same function written so that autograd's derivative is finite wherever |cos| < 1."""
        if self.is_additive_only:
            return cos - self.m3
        if self.m1 == 1.0:
            # cos(theta + m2) = cos*cos(m2) - sin*sin(m2); sqrt's derivative stays finite thanks to the floor
            sin = torch.sqrt(torch.clamp(1.0 - cos * cos, min=1e-12))
            return cos * math.cos(self.m2) - sin * math.sin(self.m2) - self.m3
        theta = torch.acos(torch.clamp(cos, -1.0 + 1e-7, 1.0 - 1e-7))
        return torch.cos(self.m1 * theta + self.m2) - self.m3

    def forward(self, logits, labels):
        labels = labels.view(-1)
        rows = torch.where(labels != -1)[0]
        cols = labels[rows]
        if self.interclass_filtering_threshold > 0:
            # non-target classes too close to a sample are taken for label noise: their logit becomes 0 and
            # gets no gradient; rows whose class lives on another shard have no target here and are filtered whole
            with torch.no_grad():
                keep = (logits <= self.interclass_filtering_threshold).to(logits.dtype)
                keep[rows, cols] = 1.0
            logits = logits * keep
        target = logits[rows, cols]
        if self.margin_gradient == "exact":
            new_target = self.margin_exact(target)
        else:
            with torch.no_grad():
                shift = self.margin_value(target) - target
            new_target = target + shift
        logits = logits.index_put((rows, cols), new_target)
        return logits * self.s
