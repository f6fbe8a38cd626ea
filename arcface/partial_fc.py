"""Partial FC (arXiv 2203.15565, arcface_torch's PartialFC_V2): the classifier split by classes over the ranks.

Every rank holds the centres of one contiguous block of classes and sees the whole global batch (embeddings are
all-gathered), so the softmax over all classes is assembled from per-shard sums and no rank ever holds a
global_batch x num_classes tensor. With sample_rate < 1 a shard scores, per step, only the classes present in the
batch plus a pseudo-random set of others (`int(sample_rate * num_local)` in all, as upstream counts them).

What stays upstream's, because files depend on it: the parameter is called `weight`, and the class blocks are laid
out as in `shard_range`, so an arcface_torch checkpoint_gpu_<rank>.pt loads into the same rank here.

What differs, and why:
- negatives are chosen by a hash of (seed, step, class id) instead of torch.rand: no other user of the global RNG
  (augmentation, dropout, a plugin) changes which classes are scored, and a resumed run scores the same classes
  without saving any sampler state;
- runs without a process group (one process);
- the loss is log-sum-exp exact where upstream clamps the target probability at 1e-30 (a loss capped at 69.08);
- labels outside [0, num_classes) and batch-size changes are errors that say so (insightface#1437), not a silent
  69.0776 or an assert.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .engine import distributed as D
from .errors import DataError

_LOW32 = 0xFFFFFFFF


def shard_range(num_classes, rank, world_size):
    """(first class, number of classes) of a rank's block.

    Blocks follow rank order; when the classes do not divide evenly, the lowest ranks take one extra class each.
    """
    base, extra = divmod(int(num_classes), int(world_size))
    sizes = [base + (1 if r < extra else 0) for r in range(world_size)]
    return sum(sizes[:rank]), sizes[rank]


def _mul_low32(x, factor):
    """(x * factor) mod 2**32 for 32-bit values, computed in 16-bit halves so int64 never overflows."""
    low, high = x & 0xFFFF, x >> 16
    return (low * factor + (((high * factor) & 0xFFFF) << 16)) & _LOW32


def _mix32(x):
    """A bijective 32-bit mixer (xor-shifts and odd multipliers): consecutive inputs give unrelated outputs.

    Works on python ints and on int64 tensors alike.
    """
    x = x ^ (x >> 16)
    x = _mul_low32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul_low32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_scores(seed, step, class_ids):
    """int64 scores in [0, 2**32) for global class ids, a pure function of (seed, step, class id).

    For fixed (seed, step) the map from class id to score is a bijection, so no two classes tie and the choice
    made from the scores is the same on every device.
    """
    salt_a = _mix32(int(seed) & _LOW32)
    salt_b = _mix32((int(step) & _LOW32) ^ salt_a)
    ids = class_ids.to(torch.int64) & _LOW32
    return _mix32(_mix32(ids ^ salt_a) ^ salt_b)


@torch.no_grad()
def sampled_centres(local_labels, class_start, num_local, num_sample, seed, step):
    """Sorted local indices of the centres a shard scores this step.

    local_labels: the global batch's labels in shard coordinates (-1 where another shard owns the class). Every
    class present is kept; the rest of the num_sample slots go to the other classes with the highest scores.
    When the present classes alone exceed num_sample, they are all kept and nothing else.
    """
    positive = torch.unique(local_labels[local_labels >= 0], sorted=True)
    free = num_sample - positive.numel()
    if free <= 0:
        return positive
    ids = torch.arange(class_start, class_start + num_local, device=local_labels.device)
    scores = sample_scores(seed, step, ids)
    scores[positive] = -1
    negative = torch.topk(scores, free, sorted=False).indices
    return torch.cat([positive, negative]).sort().values


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's embeddings; backward hands each rank the gradient of its own rows.

    Each rank's loss depends on all rows (through its class shard), so the row gradients are summed over ranks
    first. They are then multiplied by the world size because DDP will average the backbone's gradients: the net
    effect is the gradient of the mean loss over the global batch.
    """

    @staticmethod
    def forward(ctx, tensor):
        ctx.world = D.get_world_size()
        if ctx.world == 1:
            return tensor.clone()
        parts = [torch.empty_like(tensor) for _ in range(ctx.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        if ctx.world == 1:
            return grad
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        rows = grad.shape[0] // ctx.world
        mine = D.get_rank() * rows
        return grad[mine:mine + rows] * ctx.world


def all_gather_with_grad(tensor):
    return _AllGather.apply(tensor)


class _DistCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over the global batch when the classes (columns) are split over ranks.

    The row maximum, the row sum of exponentials and the target logit are each reduced over ranks, which is all
    the softmax needs; the gradient is then softmax - one_hot on this shard's columns.
    """

    @staticmethod
    def forward(ctx, logits, labels):
        batch = logits.shape[0]
        if logits.shape[1]:
            row_max = logits.max(dim=1, keepdim=True).values
        else:  # a shard that scores no class this step still joins the reductions
            row_max = torch.full((batch, 1), -float("inf"), device=logits.device, dtype=logits.dtype)
        D.all_reduce_max(row_max)
        probs = torch.exp(logits - row_max)
        row_sum = D.all_reduce_sum(probs.sum(dim=1, keepdim=True))
        probs.div_(row_sum)
        rows = torch.where(labels != -1)[0]
        target = torch.zeros(batch, 1, device=logits.device, dtype=logits.dtype)
        target[rows, 0] = logits[rows, labels[rows]]
        D.all_reduce_sum(target)
        ctx.save_for_backward(probs, labels, rows)
        return (row_max + torch.log(row_sum) - target).mean()

    @staticmethod
    def backward(ctx, grad_out):
        probs, labels, rows = ctx.saved_tensors
        grad = probs.clone()
        grad[rows, labels[rows]] -= 1.0
        grad.mul_(grad_out / probs.shape[0])
        return grad, None


def dist_cross_entropy(logits, labels):
    return _DistCrossEntropy.apply(logits, labels)


INIT_CHUNK = 4096  # classes per generator draw of the initial centres


def initial_centres(class_start, num_local, embedding_size, seed):
    """N(0, 0.01) initial centres of classes [class_start, class_start + num_local), as upstream's scale.

    Drawn chunk by chunk of INIT_CHUNK classes, each chunk from its own generator seeded by (seed, chunk), so
    that class c starts from the same vector whatever the world size (a 1-process run and an N-process run
    start alike) and whatever else consumed the global random stream before (a plugin's modules, a teacher);
    a rank draws only the chunks its shard overlaps.
    """
    rows = torch.empty(num_local, embedding_size)
    end = class_start + num_local
    for chunk in range(class_start // INIT_CHUNK, (end - 1) // INIT_CHUNK + 1 if num_local else 0):
        lo, hi = chunk * INIT_CHUNK, min((chunk + 1) * INIT_CHUNK, end)
        generator = torch.Generator().manual_seed(_init_stream(seed, chunk))
        # always a whole chunk: torch's normal_ fills a tensor in blocks, so a row's value depends on the size drawn
        block = torch.empty(INIT_CHUNK, embedding_size).normal_(0.0, 0.01, generator=generator)
        take = slice(max(lo, class_start) - lo, hi - lo)
        rows[max(lo, class_start) - class_start:hi - class_start] = block[take]
    return rows


def _init_stream(seed, chunk):
    """A generator seed for (seed, chunk), salted so that it never equals `seed` itself: the centres must not
    replay the stream that torch.manual_seed(seed) gives the backbone or the caller."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(chunk) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2 ** 64 - 1)
    x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class PartialFC_V2(torch.nn.Module):  # noqa: N801  (upstream's name, kept for drop-in use)
    """margin_loss: (cosines, shard labels) -> scaled logits, e.g. CombinedMarginLoss.

    sample_seed picks the family of negative samples (the trainer passes cfg.seed); `forward(..., step=k)`
    picks the member: any integer that differs between forwards, the same on every rank.
    """

    _version = 2

    def __init__(self, margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False, sample_seed=0):
        super().__init__()
        if not callable(margin_loss):
            raise TypeError("margin_loss must be callable: (cos_logits, labels) -> scaled logits")
        self.rank = D.get_rank()
        self.world_size = D.get_world_size()
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.sample_rate = float(sample_rate)
        self.sample_seed = int(sample_seed)
        self.fp16 = bool(fp16)
        self.margin_softmax = margin_loss
        self.class_start, self.num_local = shard_range(self.num_classes, self.rank, self.world_size)
        self.num_sample = int(self.sample_rate * self.num_local)
        self.last_batch_size = 0
        self.forward_count = 0  # the step used when the caller gives none
        self.weight = torch.nn.Parameter(
            initial_centres(self.class_start, self.num_local, self.embedding_size, self.sample_seed))

    def sample(self, labels, step):
        """This step's centres as sorted local indices; `labels` (shard coordinates) are renumbered in place
        to positions in that index."""
        index = sampled_centres(labels, self.class_start, self.num_local, self.num_sample, self.sample_seed, step)
        present = labels >= 0
        labels[present] = torch.searchsorted(index, labels[present])
        return index

    def forward(self, local_embeddings, local_labels, step=None):
        """Mean margin cross-entropy of the global batch.

        step keys the negative sampling (sample_rate < 1). Pass a counter that the run restores on resume (the
        trainer: global_step * gradient_acc + micro-step); without it the module counts its own forwards, which
        is fine for one uninterrupted run.
        """
        if step is None:
            step = self.forward_count
        self.forward_count += 1
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
        shard_labels = labels - self.class_start
        shard_labels[(shard_labels < 0) | (shard_labels >= self.num_local)] = -1

        if self.sample_rate < 1:
            weight = self.weight[self.sample(shard_labels, step)]
        else:
            weight = self.weight

        with torch.autocast(device_type=embeddings.device.type, enabled=self.fp16,
                            dtype=torch.float16 if embeddings.device.type == "cuda" else torch.bfloat16):
            cos = F.linear(F.normalize(embeddings), F.normalize(weight))
        logits = self.margin_softmax(cos.float().clamp(-1, 1), shard_labels)
        return dist_cross_entropy(logits, shard_labels)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, num_local={self.num_local}, class_start={self.class_start}, "
                f"sample_rate={self.sample_rate}, sample_seed={self.sample_seed}, "
                f"embedding_size={self.embedding_size}")
