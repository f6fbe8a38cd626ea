"""Margin softmax heads for Partial FC: a callable (cosine logits, labels with -1 for other shards) -> scaled logits.

CombinedMarginLoss(s, m1, m2, m3) gives cos(m1*theta + m2) - m3 on the target logit:
ArcFace (1, 0.5, 0), CosFace (1, 0, 0.4), or combinations. Forward values equal arcface_torch's.
One deliberate difference: upstream applies the ArcFace margin under no_grad (a straight-through gradient,
questioned in insightface#2309); here the margin is part of the graph, so the gradient is that of the
loss actually computed. `straight_through=True` restores upstream's gradient if you need bit-for-bit runs.
"""
import math

import torch


class CombinedMarginLoss(torch.nn.Module):
    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0, straight_through=False):
        super().__init__()
        self.s = float(s)
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.straight_through = straight_through
        if self.s <= 0:
            raise ValueError(f"margin scale s must be > 0, got {s}")

    def extra_repr(self):
        return f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, filter={self.interclass_filtering_threshold}"

    def _margin(self, cos):
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos - self.m3
        if self.m1 == 1.0:
            # cos(theta + m2) in closed form: its gradient is finite wherever |cos| < 1
            sin = torch.sqrt(torch.clamp(1.0 - cos * cos, min=1e-12))
            return cos * math.cos(self.m2) - sin * math.sin(self.m2) - self.m3
        theta = torch.acos(torch.clamp(cos, -1.0 + 1e-7, 1.0 - 1e-7))
        return torch.cos(self.m1 * theta + self.m2) - self.m3

    def forward(self, logits, labels):
        labels = labels.view(-1)
        rows = torch.where(labels != -1)[0]
        cols = labels[rows]
        if self.interclass_filtering_threshold > 0:
            with torch.no_grad():
                dirty = (logits > self.interclass_filtering_threshold).to(logits.dtype)
                dirty[rows, cols] = 0
            logits = logits * (1 - dirty)
        target = logits[rows, cols]
        if self.straight_through:
            with torch.no_grad():
                delta = self._margin(target) - target
            new_target = target + delta
        else:
            new_target = self._margin(target)
        logits = logits.index_put((rows, cols), new_target)
        return logits * self.s
