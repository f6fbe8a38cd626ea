"""RPSD: relation-based pairwise similarity distillation over a memory bank with sample mining (method.md 4)."""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from arcface.engine.distributed import all_gather_nograd, all_reduce_sum
from arcface.errors import ConfigError

from ..batch import KDBatch, KDOutput
from ..memory_bank import MemoryBank
from ..mining import (critical_negative_mask, hard_negative_mask, impostor_top_values, kth_largest,
                      negative_candidates, positive_mask, random_negative_mask)
from ..student_bank import StudentQueue, StudentSlots, missing_index_error
from .base import KDLoss, compute_dtype, require_same_dim
from .registry import register_kd_loss

FORMS = ("mse", "kl")
RELATIONS = ("cross", "student", "both")
MINING = ("hard", "critical")
BANK_UPDATES = ("fifo", "momentum")
_FAR = -1e9  # a finite "minus infinity": masked logits must not turn 0 * inf into NaN gradients
# The critical threshold of one step is read from about this many impostor pairs above it: when the global batch
# has more than THRESHOLD_TAIL / far impostor pairs, every stride-th key column is used (the same columns on every
# rank), which keeps the estimate's noise small (EMA over steps on top) and its cost a fraction of the full top-m.
THRESHOLD_TAIL = 256


def mined_indices(mined, count):
    """Row-wise column indices of a boolean [b, N] mask, left-aligned into [b, M] (M = most per row), and
    which of those slots are real; padding slots point at column 0 and are masked out by the caller."""
    rows, cols = mined.nonzero(as_tuple=True)              # row-major: each row's columns ascending
    width = max(int(count.max()) if count.numel() else 0, 1)
    starts = torch.cumsum(count, 0) - count
    slot = torch.arange(rows.numel(), device=mined.device) - starts[rows]
    idx = torch.zeros(mined.shape[0], width, dtype=torch.long, device=mined.device)
    idx[rows, slot] = cols
    used = torch.arange(width, device=mined.device)[None, :] < count[:, None]
    return idx, used


def _chunk_similarities(student, keys, idx):
    return torch.einsum("bd,bmd->bm", student, keys[idx])


def mined_similarities(student, keys, idx, chunk=64, keep_bytes=256 * 2 ** 20):
    """<s_i, k_idx[i, m]> as [b, M] with gradient to the student, anchors in chunks. When the gathered keys of
    the whole batch would exceed keep_bytes they are recomputed in backward (checkpoint) instead of kept, so
    memory stays bounded by chunk x M x d; below it they are kept (faster)."""
    from torch.utils.checkpoint import checkpoint

    recompute = idx.numel() * keys.shape[1] * keys.element_size() > keep_bytes
    parts = []
    for start in range(0, student.shape[0], chunk):
        s, i = student[start:start + chunk], idx[start:start + chunk]
        if recompute and torch.is_grad_enabled() and s.requires_grad:
            parts.append(checkpoint(_chunk_similarities, s, keys, i, use_reentrant=False))
        else:
            parts.append(_chunk_similarities(s, keys, i))
    return torch.cat(parts, 0) if parts else student.new_zeros(0, idx.shape[1])


class _GatherRows(torch.autograd.Function):
    """Every rank's rows, concatenated in rank order; backward sums each row's gradient over the ranks and hands a
    rank its own rows. A row then receives the gradient of the sum of all ranks' losses, including the pairs in
    which another rank's anchor uses it as a key."""

    @staticmethod
    def forward(ctx, rows, world):
        ctx.world, ctx.rank = world, dist.get_rank()
        parts = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(parts, rows.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // ctx.world
        return grad[ctx.rank * n:(ctx.rank + 1) * n], None


def gather_rows_with_grad(rows, world_size):
    return rows if world_size == 1 else _GatherRows.apply(rows, world_size)


def relation_loss(form, target, pred, weight, used, count, tau):
    """Per-anchor loss between target and predicted similarities over the mined slots ([b, M] each).

    mse: sum_j w_j (pred_j - target_j)^2 / |R_i|.
    kl: sum_j w_j (p_j log(p_j / q_j) - p_j + q_j), p = softmax(target / tau), q = softmax(pred / tau) over R_i:
        the KL divergence when the weights are equal, and for any positive weights still >= 0 and 0 exactly at
        pred = target (the plain weighted sum of p log(p/q) is neither once w_pos != w_neg).
    """
    if form == "mse":
        return (weight * (pred - target).pow(2)).sum(dim=1) / count.clamp(min=1)
    log_p = F.log_softmax((target / tau).masked_fill(~used, _FAR), dim=1)
    log_q = F.log_softmax((pred / tau).masked_fill(~used, _FAR), dim=1)
    p, q = log_p.exp(), log_q.exp()
    return (weight * (p * (log_p - log_q) - p + q)).sum(dim=1)


@register_kd_loss("rpsd")
class RPSDLoss(KDLoss):
    """Match the student's pairwise similarities to the teacher's, on keys mined by the teacher.

    For local anchor i the keys j are the other samples of the all-gathered batch (other by dataset index when the
    loader gives indices, so a repeated image is not its own positive) plus the valid bank entries.
    Target a_ij = <t^_i, t^_j> (teacher with teacher, no gradient); the student side is, by `relation`:

        'cross'   b_ij = <s^_i, t^_j>: the student against the teacher's keys. Since b_ij - a_ij =
                  <s^_i - t^_i, t^_j>, this is an instance loss (minimum at s^_i = t^_i), not a relation.
        'student' c_ij = <s^_i, s^_j>: student with student, so any student space with the teacher's geometry
                  (a rotation of it, say) is a minimum. In-batch keys carry gradient at both ends; bank keys are
                  the student's stale, detached embeddings kept beside each teacher key.
        'both'    the mean of the two per-anchor losses.

    Mined set R_i = positives (every key with y_j = y_i) + k_neg negatives + k_rand random negatives, chosen from
    teacher similarities only: the hardest (mining='hard') or those closest to the teacher's threshold at
    `far` (mining='critical', the pairs that decide verification at that FAR). The teacher's [b, keys]
    similarities are built for mining; the student's only at the mined keys.

    Parameters (config keys):
        bank: memory bank slots (16384); 0 = in-batch keys only. 'fifo': >= the global batch; 'momentum': >= the
              number of training samples.
        k_neg: mined negatives per anchor (256).
        k_rand: random extra negatives per anchor, fixed by (seed, step, anchor) (0).
        form: 'mse' = mean over R_i of w_j (pred - target)^2, then mean over anchors (default);
              'kl' = the KL between softmax(target / tau) and softmax(pred / tau) over R_i (one temperature on
              both sides, so the minimum is the teacher's relations; see relation_loss for the weights).
        relation: 'cross' (default), 'student' or 'both', as above.
        mining: 'hard' (default) or 'critical'.
        far: mining='critical': the false accept rate whose teacher threshold the negatives are mined around
             (None = 1e-4); the threshold is the teacher similarity exceeded by that fraction of the global
             batch's impostor pairs (anchor x other-label key; a fixed column subsample of them when there are
             more than THRESHOLD_TAIL / far, see above).
        far_momentum: mining='critical': EMA momentum of that threshold over steps (None = 0.9; 0 = this batch's).
        bank_update: how the bank keeps its entries: 'fifo' (default; a queue of the newest samples) or
                     'momentum' (one slot per training sample by dataset index, moved with bank_momentum; needs a
                     loader that returns sample indices). With relation 'student'/'both' either bank also holds
                     the student's embedding of each entry.
        bank_momentum: bank_update='momentum': weight of the old entry when a sample is seen again (None = 0.5).
        tau: 'kl' temperature of both sides (0.1).
        w_pos: weight of positive keys (1.0); 0 leaves positives out of the mined set altogether.
        w_neg: weight of negative keys, mined and random (1.0).
        min_bank: valid bank entries needed before the bank is used; before that, in-batch keys only
                  (None = k_neg).
        fp16: store the bank in float16 (False).
        seed: seed of the random negatives (0).
        require_positives: refuse to start without a P x K sampler when w_pos > 0 (True).

    Distributed: mining over the all-gathered detached batch; the critical threshold over the global batch's
    impostor pairs. With relation 'student' the student embeddings are gathered with a gradient-carrying gather
    whose backward sums every row's gradient over ranks, and each rank returns the mean over its local anchors:
    the sum over ranks of what a row receives is world_size times its global-batch gradient, which DDP's average
    divides back. The bank is filled in after_step from the all-gathered batch, identical on every rank.
    Statistics: pos_per_anchor, neg_per_anchor, bank_fill, sim_gap (cross: mean |b - a| over mined keys),
    rel_gap (student: mean |c - a|), threshold (critical mining).
    """

    def __init__(self, bank=16384, k_neg=256, k_rand=0, form="mse", relation="cross", mining="hard", far=None,
                 far_momentum=None, bank_update="fifo", bank_momentum=None, tau=0.1, w_pos=1.0, w_neg=1.0,
                 min_bank=None, fp16=False, seed=0, require_positives=True):
        super().__init__()
        where = "KD loss 'rpsd'"
        for key, value, allowed in (("form", form, FORMS), ("relation", relation, RELATIONS),
                                    ("mining", mining, MINING), ("bank_update", bank_update, BANK_UPDATES)):
            if value not in allowed:
                raise ConfigError(f"{where}: {key} must be one of {allowed}, got {value!r}")
        if int(bank) < 0:
            raise ConfigError(f"{where}: bank must be a number of slots >= 0 (0: in-batch keys only), got {bank}")
        for key, value in (("k_neg", k_neg), ("k_rand", k_rand)):
            if int(value) < 0:
                raise ConfigError(f"{where}: {key} must be >= 0, got {value}")
        if float(tau) <= 0:
            raise ConfigError(f"{where}: tau must be > 0, got {tau}")
        for key, value in (("w_pos", w_pos), ("w_neg", w_neg)):
            if float(value) < 0:
                raise ConfigError(f"{where}: {key} must be >= 0, got {value}")
        if mining != "critical" and (far is not None or far_momentum is not None):
            raise ConfigError(f"{where}: far / far_momentum choose the threshold of mining='critical'; with "
                              f"mining={mining!r} they would do nothing")
        if bank_update != "momentum" and bank_momentum is not None:
            raise ConfigError(f"{where}: bank_momentum applies to bank_update='momentum' only")
        far = 1e-4 if far is None else float(far)
        far_momentum = 0.9 if far_momentum is None else float(far_momentum)
        bank_momentum = 0.5 if bank_momentum is None else float(bank_momentum)
        if not 0.0 < far < 1.0:
            raise ConfigError(f"{where}: far must be in (0, 1), got {far}")
        for key, value in (("far_momentum", far_momentum), ("bank_momentum", bank_momentum)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{where}: {key} must be in [0, 1), got {value}")
        min_bank = int(k_neg) if min_bank is None else int(min_bank)
        if int(bank) > 0 and min_bank > int(bank):
            raise ConfigError(f"{where}: min_bank={min_bank} exceeds bank={bank}, so the bank would never be "
                              f"used; lower min_bank (or k_neg) or raise bank")
        self.bank_size, self.k_neg, self.k_rand = int(bank), int(k_neg), int(k_rand)
        self.form, self.relation, self.mining, self.tau = form, relation, mining, float(tau)
        self.far, self.far_momentum = far, far_momentum
        self.bank_update = bank_update
        self.w_pos, self.w_neg, self.min_bank = float(w_pos), float(w_neg), min_bank
        self.seed, self.require_positives = int(seed), bool(require_positives)
        self.uses_student_keys = relation in ("student", "both")
        if self.bank_size == 0:
            self.bank = None
        elif bank_update == "momentum":
            self.bank = StudentSlots(self.bank_size, momentum=bank_momentum, fp16=fp16)
        elif self.uses_student_keys:
            self.bank = StudentQueue(self.bank_size, fp16=fp16)
        else:
            self.bank = MemoryBank(self.bank_size, fp16=fp16)
        if mining == "critical":
            self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
            self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.int64))

    # ---- start-up checks ----------------------------------------------------------------------------------
    def check(self, global_batch_size, pk_sampler):
        if self.bank_update == "fifo" and 0 < self.bank_size < global_batch_size:
            raise ConfigError(f"KD loss 'rpsd': bank={self.bank_size} is smaller than the global batch "
                              f"({global_batch_size}): one enqueue would overwrite itself; raise bank to at least "
                              f"{global_batch_size}")
        if self.require_positives and self.w_pos > 0 and not pk_sampler:
            raise ConfigError("KD loss 'rpsd' needs positive pairs (w_pos > 0, require_positives=True), but the "
                              "random sampler almost never puts two images of one identity in a batch: use the "
                              "P x K sampler (cfg.sampler='pk'), or set require_positives=False (or w_pos=0)")

    def bind_training(self, ctx):
        if not isinstance(self.bank, StudentSlots):
            return
        cfg = ctx.cfg
        if cfg.get("dali") or cfg.get("dali_aug"):
            raise ConfigError("KD loss 'rpsd': bank_update='momentum' keeps one slot per dataset index, but the "
                              "DALI loader (dali=True) does not return sample indices; set dali=False or use "
                              "bank_update='fifo'")
        samples = getattr(ctx.train_loader, "num_samples", None)
        if isinstance(samples, int) and samples > self.bank_size:
            raise ConfigError(f"KD loss 'rpsd': bank_update='momentum' needs one slot per training sample, but "
                              f"bank={self.bank_size} < {samples} training images; set bank to at least {samples} "
                              f"(or use bank_update='fifo')")

    # ---- keys -----------------------------------------------------------------------------------------
    def _bank_in_use(self):
        return self.bank is not None and self.bank.dim is not None and \
            self.bank.num_valid() >= max(self.min_bank, 1)

    def _keys(self, batch, dtype):
        """Teacher keys [N, d] (the gathered batch first, then the bank), their labels [N], the validity [b, N]
        for the local anchors (self excluded) and whether the bank is in use."""
        keys = F.normalize(batch.gathered_teacher().to(dtype), dim=1)
        labels = batch.gathered_labels()
        n_batch = keys.shape[0]
        anchors = torch.arange(batch.local_size, device=keys.device) + batch.offset
        valid = torch.arange(n_batch, device=keys.device)[None, :] != anchors[:, None]
        index = batch.gathered_index()
        if index is not None:
            # a P x K batch may hold the same image twice (an identity with fewer than K images): the copy is the
            # anchor itself, not a positive, whatever its position
            index = index.to(keys.device)
            valid &= index[None, :] != index[batch.offset:batch.offset + batch.local_size, None]
        bank_used = self._bank_in_use()
        if bank_used:
            bank_valid = self.bank.valid
            if self.bank.uses_index:
                # the current samples' own slots hold older views of them; their live versions are in-batch keys
                bank_valid = bank_valid & ~self._slots_of_batch(batch)
            keys = torch.cat([keys, self.bank.feats.to(dtype)], dim=0)
            labels = torch.cat([labels, self.bank.labels.to(labels.device)], dim=0)
            valid = torch.cat([valid, bank_valid[None, :].expand(batch.local_size, -1)], dim=1)
        return keys, labels, valid, anchors, bank_used

    def _slots_of_batch(self, batch):
        if batch.index is None:
            raise missing_index_error()
        index = batch.gathered_index()
        mask = torch.zeros(self.bank.size, dtype=torch.bool, device=self.bank.valid.device)
        index = index.to(mask.device)
        mask[index[(index >= 0) & (index < self.bank.size)]] = True
        return mask

    # ---- critical mining ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _far_threshold(self, a, candidates, batch):
        """The teacher's similarity threshold at `far` over the global batch's impostor pairs (every stride-th key
        column when there are more than THRESHOLD_TAIL / far pairs), smoothed over steps with far_momentum; the
        same value on every rank."""
        pairs = batch.global_size * a.shape[1]
        stride = max(1, int(pairs * self.far // THRESHOLD_TAIL))
        if stride > 1:
            a, candidates = a[:, ::stride], candidates[:, ::stride]
        count = candidates.sum().to(torch.float64).reshape(1)
        if batch.world_size > 1:
            all_reduce_sum(count)
        if float(count) == 0:
            return self.threshold.to(a.dtype)
        m = max(1, math.ceil(round(self.far * float(count), 9)))
        top = impostor_top_values(a, candidates, m)
        if batch.world_size > 1:
            top = all_gather_nograd(top)
        value = kth_largest(top, m).to(torch.float64)
        if int(self.threshold_steps) > 0:
            value = self.far_momentum * self.threshold + (1.0 - self.far_momentum) * value
        self.threshold.copy_(value)
        self.threshold_steps += 1
        return self.threshold.to(a.dtype)

    # ---- the loss -------------------------------------------------------------------------------------
    def _student_key_similarities(self, student, batch, idx, n_batch, bank_used, dtype):
        """c_ij = <s^_i, s^_j> at the mined keys: in-batch keys from the gradient-carrying gather of the
        student batch, bank keys from the bank's stale student entries."""
        gathered = gather_rows_with_grad(student, batch.world_size)
        anchors = gathered[batch.offset:batch.offset + batch.local_size]
        in_batch = idx < n_batch
        c = (anchors @ gathered.t()).gather(1, idx.clamp(max=n_batch - 1))
        if bank_used and bool((~in_batch).any()):
            from_bank = mined_similarities(anchors, self.bank.student.to(dtype), (idx - n_batch).clamp(min=0))
            c = torch.where(in_batch, c, from_bank)
        return c

    def forward(self, batch: KDBatch) -> KDOutput:
        require_same_dim(batch, self.name)
        dtype = compute_dtype(batch.student)
        student = F.normalize(batch.student.to(dtype), dim=1)
        teacher = F.normalize(batch.teacher.detach().to(dtype), dim=1)
        keys, key_labels, valid, anchors, bank_used = self._keys(batch, dtype)
        n_batch = batch.global_size

        a = teacher @ keys.t()                                  # [b, N], no gradient: mining needs every key
        stats = {}
        with torch.no_grad():
            # w_pos = 0: positives are neither mined nor counted (their weight would zero them anyway, but they
            # would still take slots, enter the KL's softmax and the per-anchor mean)
            pos = positive_mask(batch.labels, key_labels, valid) if self.w_pos > 0 else torch.zeros_like(valid)
            cand = negative_candidates(batch.labels, key_labels, valid)
            if self.mining == "hard":
                neg = hard_negative_mask(a, cand, self.k_neg)
            else:
                threshold = self._far_threshold(a, cand, batch)
                neg = critical_negative_mask(a, cand, threshold, self.k_neg)
                stats["threshold"] = float(threshold)
            if self.k_rand > 0:
                neg |= random_negative_mask(cand & ~neg, self.k_rand, self.seed, batch.step, anchors)
            mined = pos | neg
            weight = torch.where(pos, self.w_pos, 0.0).to(dtype).masked_fill_(neg, self.w_neg)
            n_pos, n_neg = pos.sum(dim=1), neg.sum(dim=1)   # disjoint: same label vs other label
            count = n_pos + n_neg
            idx, used = mined_indices(mined, count)         # [b, M]: the mined keys of each anchor, padded
            a_sel = a.gather(1, idx)
            w_sel = weight.gather(1, idx) * used

        parts = []
        n_used = max(int(count.sum()), 1)
        if self.relation in ("cross", "both"):
            # the student's similarities at the mined keys only, not as a full [b, N] product
            b_sel = mined_similarities(student, keys, idx)
            parts.append(relation_loss(self.form, a_sel, b_sel, w_sel, used, count, self.tau))
            stats["sim_gap"] = float((b_sel.detach() - a_sel).abs().masked_fill_(~used, 0).sum()) / n_used
        if self.uses_student_keys:
            c_sel = self._student_key_similarities(student, batch, idx, n_batch, bank_used, dtype)
            parts.append(relation_loss(self.form, a_sel, c_sel, w_sel, used, count, self.tau))
            stats["rel_gap"] = float((c_sel.detach() - a_sel).abs().masked_fill_(~used, 0).sum()) / n_used
        per_anchor = parts[0] if len(parts) == 1 else 0.5 * (parts[0] + parts[1])
        loss = per_anchor.mean()

        stats.update({
            "pos_per_anchor": float(n_pos.sum()) / batch.local_size,
            "neg_per_anchor": float(n_neg.sum()) / batch.local_size,
            "bank_fill": self.bank.fill() if self.bank is not None else 0.0,
        })
        return KDOutput(loss=loss, stats=stats)

    @torch.no_grad()
    def after_step(self, batch: KDBatch) -> None:
        if self.bank is None:
            return
        if isinstance(self.bank, MemoryBank) and not isinstance(self.bank, StudentQueue):
            self.bank.enqueue(batch.gathered_teacher(), batch.gathered_labels())
            return
        student = batch.student.detach().float()
        index = batch.index
        if batch.world_size > 1:
            student = all_gather_nograd(student)
            index = all_gather_nograd(index.to(torch.int64)) if index is not None else None
        self.bank.update(batch.gathered_teacher(), student, batch.gathered_labels(), index)
