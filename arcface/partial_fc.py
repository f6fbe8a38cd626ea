"""Partial FC (arcface_torch PartialFC_V2 semantics): class centres sharded over ranks, sampled per step.

Each rank owns a contiguous block of classes ([class_start, class_start + num_local)). Embeddings are
all-gathered, every rank scores the global batch against its (sampled) centres, and a distributed
softmax cross-entropy combines the shards, so no tensor of size global_batch x num_classes exists anywhere:
logits are global_batch x sampled local classes. The same code runs with 1 process (a group of one, or no
group at all).

Differences from upstream: works without a process group; a clear error instead of an assert when batch
sizes differ between steps or ranks; labels outside [0, num_classes) are an error, not the silent loss
69.0776 (insightface#1437); the loss is computed in log-sum-exp form, so it is exact where upstream clamps
the target probability at 1e-30 (which caps a sample at 69.08).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .engine import distributed as D
from .errors import DataError


def shard_range(num_classes, rank, world_size):
    """(class_start, num_local) of a rank: contiguous blocks, the first C % W ranks one class larger."""
    num_local = num_classes // world_size + int(rank < num_classes % world_size)
    class_start = num_classes // world_size * rank + min(rank, num_classes % world_size)
    return class_start, num_local


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums the gradient over ranks and keeps this rank's chunk.

    The sum collects the contributions of every class shard; the factor world_size cancels DDP's
    averaging of backbone gradients, so the backbone receives the gradient of the global-mean loss.
    """

    @staticmethod
    def forward(ctx, tensor):
        world = D.get_world_size()
        ctx.world = world
        if world == 1:
            return tensor.clone()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        if ctx.world == 1:
            return grad
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        chunk = grad.shape[0] // ctx.world
        rank = D.get_rank()
        return grad[rank * chunk:(rank + 1) * chunk] * ctx.world


def all_gather_with_grad(tensor):
    return _AllGather.apply(tensor)


class _DistCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over the global batch when each rank holds a slice of the classes."""

    @staticmethod
    def forward(ctx, logits, labels):
        batch = logits.shape[0]
        local_max = logits.max(dim=1, keepdim=True)[0] if logits.shape[1] else \
            torch.full((batch, 1), -float("inf"), device=logits.device, dtype=logits.dtype)
        D.all_reduce_max(local_max)
        probs = torch.exp(logits - local_max)
        denom = probs.sum(dim=1, keepdim=True)
        D.all_reduce_sum(denom)
        probs.div_(denom)
        rows = torch.where(labels != -1)[0]
        target = torch.zeros(batch, 1, device=logits.device, dtype=logits.dtype)
        target[rows, 0] = logits[rows, labels[rows]]
        D.all_reduce_sum(target)
        ctx.save_for_backward(probs, labels, rows)
        # log-sum-exp form: exact where upstream's clamp of the target probability at 1e-30 caps the loss
        return (local_max + torch.log(denom) - target).mean()

    @staticmethod
    def backward(ctx, grad_out):
        probs, labels, rows = ctx.saved_tensors
        grad = probs.clone()
        grad[rows, labels[rows]] -= 1.0
        grad.mul_(grad_out / probs.shape[0])
        return grad, None


def dist_cross_entropy(logits, labels):
    return _DistCrossEntropy.apply(logits, labels)


class PartialFC_V2(torch.nn.Module):  # noqa: N801  (upstream's name, kept for drop-in use)
    _version = 2

    def __init__(self, margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False):
        super().__init__()
        if not callable(margin_loss):
            raise TypeError("margin_loss must be callable: (cos_logits, labels) -> scaled logits")
        self.rank = D.get_rank()
        self.world_size = D.get_world_size()
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.sample_rate = float(sample_rate)
        self.fp16 = bool(fp16)
        self.margin_softmax = margin_loss
        self.class_start, self.num_local = shard_range(self.num_classes, self.rank, self.world_size)
        self.num_sample = int(self.sample_rate * self.num_local)
        self.last_batch_size = 0
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (self.num_local, self.embedding_size)))
        self.last_stats = {}

    @torch.no_grad()
    def sample(self, labels):
        """Keep every positive class of the global batch plus random others, num_sample in all.

        Returns the sorted local indices of the kept centres; labels are remapped in place to them.
        """
        positive = torch.unique(labels[labels >= 0], sorted=True)
        if self.num_sample - positive.numel() >= 0:
            perm = torch.rand(self.num_local, device=labels.device)
            perm[positive] = 2.0
            index = torch.topk(perm, k=self.num_sample)[1].sort()[0]
        else:
            index = positive
        mask = labels >= 0
        labels[mask] = torch.searchsorted(index, labels[mask])
        return index

    def forward(self, local_embeddings, local_labels):
        local_labels = local_labels.view(-1).long()
        batch = local_embeddings.shape[0]
        if batch != local_labels.shape[0]:
            raise ValueError(f"{batch} embeddings but {local_labels.shape[0]} labels")
        if self.last_batch_size == 0:
            self.last_batch_size = batch
        elif batch != self.last_batch_size:
            raise DataError(f"Partial FC got a batch of {batch} after batches of {self.last_batch_size}: every rank "
                            "and step must use the same batch size (drop the last partial batch)")
        embeddings = all_gather_with_grad(local_embeddings)
        labels = D.all_gather_nograd(local_labels)
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            raise DataError(f"label {int(labels[bad][0])} outside [0, num_classes={self.num_classes}); "
                            "check cfg.num_classes against the data")
        labels = labels.clone()
        local = (labels >= self.class_start) & (labels < self.class_start + self.num_local)
        labels[~local] = -1
        labels[local] -= self.class_start

        if self.sample_rate < 1:
            index = self.sample(labels)
            weight = self.weight[index]
        else:
            weight = self.weight

        with torch.autocast(device_type=embeddings.device.type, enabled=self.fp16,
                            dtype=torch.float16 if embeddings.device.type == "cuda" else torch.bfloat16):
            logits = F.linear(F.normalize(embeddings), F.normalize(weight))
        logits = logits.float().clamp(-1, 1)
        logits = self.margin_softmax(logits, labels)
        return dist_cross_entropy(logits, labels)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, num_local={self.num_local}, class_start={self.class_start}, "
                f"sample_rate={self.sample_rate}, embedding_size={self.embedding_size}")
