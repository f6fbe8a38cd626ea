"""The record every training loader yields (PyTorch workers or DALI), so the trainer sees one type."""
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Batch:
    """One training batch on the device."""
    images: torch.Tensor                   # [b, 3, H, W] float32, (x - 127.5) / 127.5, RGB
    labels: torch.Tensor                   # [b] int64
    index: Optional[torch.Tensor] = None   # [b] int64 dataset indices (None where the loader cannot tell)
    flip: Optional[torch.Tensor] = None    # [b] bool, horizontally flipped
