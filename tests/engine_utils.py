"""A tiny in-memory loader with the TrainLoader protocol, so engine tests do not depend on data files."""
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class MemBatch:
    images: torch.Tensor
    labels: torch.Tensor
    index: Optional[torch.Tensor] = None
    flip: Optional[torch.Tensor] = None


class TensorLoader:
    """Deterministic per-epoch shuffles of fixed tensors, sharded by rank, full batches only."""

    def __init__(self, images, labels, batch_size, rank=0, world_size=1, seed=0):
        self.images, self.labels = images, labels
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.epoch, self.start_batch = 0, 0

    def __len__(self):
        return len(self.labels) // (self.batch_size * self.world_size)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.labels), generator=g)
        per_rank = len(self) * self.batch_size
        mine = order[self.rank::self.world_size][:per_rank]
        for b in range(self.start_batch, len(self)):
            idx = mine[b * self.batch_size:(b + 1) * self.batch_size]
            yield MemBatch(self.images[idx], self.labels[idx], idx, torch.zeros(len(idx), dtype=torch.bool))


class CrashAfter:
    """Wraps a loader and raises after n batches, to simulate a killed run."""

    def __init__(self, loader, n):
        self.loader, self.n, self.seen = loader, n, 0

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch, start_batch=0):
        self.loader.set_epoch(epoch, start_batch)

    def __iter__(self):
        for batch in self.loader:
            if self.seen == self.n:
                raise KeyboardInterrupt("simulated kill")
            self.seen += 1
            yield batch


def make_data(n=96, classes=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    protos = torch.randn(classes, 3, size, size, generator=g)
    images = protos[labels] + 0.5 * torch.randn(n, 3, size, size, generator=g)
    return images, labels
