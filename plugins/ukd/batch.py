"""The typed record every KD loss is fed: fields, not a dict of strings."""
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from arcface.engine.distributed import all_gather_nograd


@dataclass
class KDBatch:
    student: torch.Tensor                 # [b, d] student embedding (after the projector, if any), with gradient
    teacher: torch.Tensor                 # [b, d] teacher embedding, no gradient
    labels: torch.Tensor                  # [b] int64
    step: int = 0                         # global optimizer step
    rank: int = 0
    world_size: int = 1
    index: Optional[torch.Tensor] = None  # [b] dataset indices, when the loader gives them
    flip: Optional[torch.Tensor] = None   # [b] bool
    _cache: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def local_size(self):
        return self.student.shape[0]

    @property
    def global_size(self):
        return self.local_size * self.world_size

    @property
    def offset(self):
        """Position of this rank's first sample in the all-gathered global batch."""
        return self.rank * self.local_size

    def gathered_teacher(self):
        """Teacher embeddings of the whole global batch (rank order), gathered once per step."""
        if "teacher" not in self._cache:
            self._cache["teacher"] = all_gather_nograd(self.teacher.detach().float())
        return self._cache["teacher"]

    def gathered_labels(self):
        if "labels" not in self._cache:
            self._cache["labels"] = all_gather_nograd(self.labels)
        return self._cache["labels"]

    def gathered_index(self):
        """Dataset indices of the whole global batch (rank order), or None when the loader gives none."""
        if self.index is None:
            return None
        if "index" not in self._cache:
            index = self.index.to(torch.int64)
            self._cache["index"] = all_gather_nograd(index) if self.world_size > 1 else index
        return self._cache["index"]


@dataclass
class KDOutput:
    loss: torch.Tensor                               # scalar, unweighted
    stats: Dict[str, float] = field(default_factory=dict)  # e.g. {"hard_frac": 0.25, "bank_fill": 0.5}
