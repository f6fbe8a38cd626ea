"""The worked example in docs/plugins.md runs as written and gives the loss it documents."""
import math
import re
from pathlib import Path

import torch

from plugins.ukd import KD_LOSSES, build_kd_loss
from plugins.ukd.batch import KDBatch

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def test_worked_example_registers_and_computes():
    text = DOC.read_text()
    code = re.search(r"```python\n(# plugins/ukd/losses/angular.py.*?)```", text, re.S).group(1)
    if "angular" not in KD_LOSSES:
        exec(compile(code, "docs/plugins.md", "exec"), {"__name__": "docs_example"})
    loss = build_kd_loss("angular", power=2.0)
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    t = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    out = loss(KDBatch(student=s, teacher=t, labels=torch.tensor([0, 1])))
    expected = ((math.pi / 4) ** 2 + 0.0) / 2
    assert abs(float(out.loss) - expected) < 1e-4
    assert abs(out.stats["angle_deg"] - 22.5) < 0.1  # the clamp leaves 0.08 deg on the aligned pair
    out.loss.backward()
    assert torch.isfinite(s.grad).all()
