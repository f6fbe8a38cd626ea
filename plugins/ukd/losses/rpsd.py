"""RPSD: relation-based pairwise similarity distillation over a teacher memory bank (paper.md section 1.3)."""
import torch
import torch.nn.functional as F

from arcface.errors import ConfigError

from ..batch import KDBatch, KDOutput
from ..memory_bank import MemoryBank
from ..mining import hard_negative_mask, negative_candidates, positive_mask, random_negative_mask
from .base import KDLoss, compute_dtype, require_same_dim
from .registry import register_kd_loss

FORMS = ("mse", "kl")
_FAR = -1e9  # a finite "minus infinity": masked logits must not turn 0 * inf into NaN gradients


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


@register_kd_loss("rpsd")
class RPSDLoss(KDLoss):
    """Match the student's similarities to teacher keys with the teacher's own, on mined keys.

    For local anchor i the keys are the valid bank entries plus the all-gathered current teacher batch,
    minus anchor i itself; a_ij = <t^_i, k_j> (teacher), b_ij = <s^_i, k_j> (student). Mined set
    R_i = positives (every key with y_j = y_i) + the k_neg other-label keys the teacher finds most similar
    + k_rand random other-label keys. The teacher's [b, keys] similarities are built for mining; the student's
    only at the mined keys, in chunks of anchors, so nothing of size [b, keys, d] exists.

    Parameters (config keys):
        bank: memory bank slots of teacher embeddings (16384); must be >= the global batch size.
        k_neg: hard negatives per anchor, ranked by teacher similarity (256).
        k_rand: random extra negatives per anchor, fixed by (seed, step, anchor) (0).
        form: 'mse' = mean over R_i of w_j (b_ij - a_ij)^2, then mean over anchors (default);
              'kl' = sum over R_i of w_j p_j log(p_j / q_j), p = softmax(a / tau_t), q = softmax(b / tau_s)
              over R_i (no tau^2 factor; equal weights give the plain KL).
        tau_t: 'kl' teacher temperature (0.1).
        tau_s: 'kl' student temperature (0.02).
        w_pos: weight of positive keys (1.0).
        w_neg: weight of negative keys, hard and random (1.0).
        min_bank: valid bank entries needed before the bank is used; before that, in-batch keys only
                  (None = k_neg).
        fp16: store the bank in float16 (False).
        seed: seed of the random negatives (0).
        require_positives: refuse to start without a P x K sampler when w_pos > 0 (True).

    Distributed: the bank is filled in after_step with the all-gathered global batch (identical on every
    rank); each rank returns the mean over its local anchors, whose DDP average is the global mean.
    Statistics: pos_per_anchor, neg_per_anchor, bank_fill, sim_gap (mean |b - a| over mined keys).
    """

    def __init__(self, bank=16384, k_neg=256, k_rand=0, form="mse", tau_t=0.1, tau_s=0.02, w_pos=1.0,
                 w_neg=1.0, min_bank=None, fp16=False, seed=0, require_positives=True):
        super().__init__()
        where = "KD loss 'rpsd'"
        if form not in FORMS:
            raise ConfigError(f"{where}: form must be one of {FORMS}, got {form!r}")
        if int(bank) <= 0:
            raise ConfigError(f"{where}: bank must be a positive number of slots, got {bank}")
        for key, value in (("k_neg", k_neg), ("k_rand", k_rand)):
            if int(value) < 0:
                raise ConfigError(f"{where}: {key} must be >= 0, got {value}")
        for key, value in (("tau_t", tau_t), ("tau_s", tau_s)):
            if float(value) <= 0:
                raise ConfigError(f"{where}: {key} must be > 0, got {value}")
        for key, value in (("w_pos", w_pos), ("w_neg", w_neg)):
            if float(value) < 0:
                raise ConfigError(f"{where}: {key} must be >= 0, got {value}")
        min_bank = int(k_neg) if min_bank is None else int(min_bank)
        if min_bank > int(bank):
            raise ConfigError(f"{where}: min_bank={min_bank} exceeds bank={bank}, so the bank would never be "
                              f"used; lower min_bank (or k_neg) or raise bank")
        self.bank_size, self.k_neg, self.k_rand = int(bank), int(k_neg), int(k_rand)
        self.form, self.tau_t, self.tau_s = form, float(tau_t), float(tau_s)
        self.w_pos, self.w_neg, self.min_bank = float(w_pos), float(w_neg), min_bank
        self.seed, self.require_positives = int(seed), bool(require_positives)
        self.bank = MemoryBank(self.bank_size, fp16=fp16)

    def check(self, global_batch_size, pk_sampler):
        if self.bank_size < global_batch_size:
            raise ConfigError(f"KD loss 'rpsd': bank={self.bank_size} is smaller than the global batch "
                              f"({global_batch_size}): one enqueue would overwrite itself; raise bank to at least "
                              f"{global_batch_size}")
        if self.require_positives and self.w_pos > 0 and not pk_sampler:
            raise ConfigError("KD loss 'rpsd' needs positive pairs (w_pos > 0, require_positives=True), but the "
                              "random sampler almost never puts two images of one identity in a batch: use the "
                              "P x K sampler (cfg.sampler='pk'), or set require_positives=False (or w_pos=0)")

    def _keys(self, batch, dtype):
        """Teacher keys [N, d], their labels [N] and validity [b, N] for the local anchors (self excluded)."""
        keys = F.normalize(batch.gathered_teacher().to(dtype), dim=1)
        labels = batch.gathered_labels()
        n_batch = keys.shape[0]
        anchors = torch.arange(batch.local_size, device=keys.device) + batch.offset
        valid = torch.arange(n_batch, device=keys.device)[None, :] != anchors[:, None]
        bank_used = self.bank.dim is not None and self.bank.num_valid() >= max(self.min_bank, 1)
        if bank_used:
            keys = torch.cat([keys, self.bank.feats.to(dtype)], dim=0)
            labels = torch.cat([labels, self.bank.labels.to(labels.device)], dim=0)
            valid = torch.cat([valid, self.bank.valid[None, :].expand(batch.local_size, -1)], dim=1)
        return keys, labels, valid, anchors

    def forward(self, batch: KDBatch) -> KDOutput:
        require_same_dim(batch, self.name)
        dtype = compute_dtype(batch.student)
        student = F.normalize(batch.student.to(dtype), dim=1)
        teacher = F.normalize(batch.teacher.detach().to(dtype), dim=1)
        keys, key_labels, valid, anchors = self._keys(batch, dtype)

        a = teacher @ keys.t()                                  # [b, N], no gradient: mining needs every key
        with torch.no_grad():
            pos = positive_mask(batch.labels, key_labels, valid)
            cand = negative_candidates(batch.labels, key_labels, valid)
            neg = hard_negative_mask(a, cand, self.k_neg)
            if self.k_rand > 0:
                neg |= random_negative_mask(cand & ~neg, self.k_rand, self.seed, batch.step, anchors)
            mined = pos | neg
            weight = torch.where(pos, self.w_pos, 0.0).to(dtype).masked_fill_(neg, self.w_neg)
            n_pos, n_neg = pos.sum(dim=1), neg.sum(dim=1)   # disjoint: same label vs other label
            count = n_pos + n_neg
            idx, used = mined_indices(mined, count)         # [b, M]: the mined keys of each anchor, padded
            a_sel = a.gather(1, idx)
            w_sel = weight.gather(1, idx) * used
        # The student's similarities are needed at the mined keys only (k_neg + positives of N): computing
        # them there instead of as a full [b, N] product cuts RPSD's cost by about two thirds.
        b_sel = mined_similarities(student, keys, idx)

        diff = b_sel - a_sel
        if self.form == "mse":
            per_anchor = (w_sel * diff.pow(2)).sum(dim=1) / count.clamp(min=1)
        else:
            log_p = F.log_softmax((a_sel / self.tau_t).masked_fill(~used, _FAR), dim=1)
            log_q = F.log_softmax((b_sel / self.tau_s).masked_fill(~used, _FAR), dim=1)
            per_anchor = (w_sel * log_p.exp() * (log_p - log_q)).sum(dim=1)
        loss = per_anchor.mean()

        with torch.no_grad():
            stats = {
                "pos_per_anchor": float(n_pos.sum()) / batch.local_size,
                "neg_per_anchor": float(n_neg.sum()) / batch.local_size,
                "bank_fill": self.bank.fill(),
                "sim_gap": float(diff.detach().abs().masked_fill_(~used, 0).sum()) / max(int(count.sum()), 1),
            }
        return KDOutput(loss=loss, stats=stats)

    @torch.no_grad()
    def after_step(self, batch: KDBatch) -> None:
        self.bank.enqueue(batch.gathered_teacher(), batch.gathered_labels())
