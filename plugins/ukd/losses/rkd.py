"""RKD: relational KD, distance and angle terms (Park et al., CVPR 2019; paper.md section 4)."""
import torch
import torch.nn.functional as F

from arcface.engine.distributed import all_gather_nograd, all_reduce_sum
from arcface.errors import ConfigError

from ..batch import KDBatch, KDOutput
from .base import KDLoss, compute_dtype
from .registry import register_kd_loss

_EPS = 1e-12


def pair_distance(x, y):
    """[n, m] Euclidean distances from Gram matrices (keeps gradients on either side)."""
    sq = x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :] - 2 * x @ y.t()
    return sq.clamp(min=_EPS).sqrt()


def angle_block(xi, xj, xk):
    """[ni, nj, nk] cosine of the angle at apex x_j between x_i and x_k, from Gram matrices only.

    <x_i - x_j, x_k - x_j> = <x_i,x_k> - <x_i,x_j> - <x_k,x_j> + <x_j,x_j>: no [n, n, d] difference tensors.
    """
    g_ik, g_ij, g_kj = xi @ xk.t(), xi @ xj.t(), xk @ xj.t()
    n_j = xj.pow(2).sum(1)
    num = g_ik[:, None, :] - g_ij[:, :, None] - g_kj.t()[None, :, :] + n_j[None, :, None]
    den = pair_distance(xi, xj)[:, :, None] * pair_distance(xk, xj).t()[None, :, :]
    return num / den


def huber(x):
    return F.smooth_l1_loss(x, torch.zeros_like(x), reduction="none", beta=1.0)


@register_kd_loss("rkd")
class RKDLoss(KDLoss):
    """L = w_d * L_dist + w_a * L_angle over the global batch, Huber (smooth-L1, delta 1) on each relation.

    L_dist = mean over ordered pairs i != j of huber(||s_i - s_j|| / mu_s - ||t_i - t_j|| / mu_t), mu = the
    mean pairwise distance (the student's keeps its gradient, as in Park et al.).
    L_angle = mean over triplets (i, j, k) with i != j, k != j of huber(cos_s(i,j,k) - cos_t(i,j,k)), the
    angle at apex j. Degenerate pairs and triplets are left out of the means (they carry no relation).

    Parameters (config keys):
        w_d: weight of the distance term (25.0, as TFace).
        w_a: weight of the angle term (50.0, as TFace).
        normalize: L2-normalise both embeddings first (False: raw embeddings, as Park et al.; dims may differ).

    Distributed: rank r evaluates the relations in which its local samples sit as first end (pairs and
    triplets) against the all-gathered detached batch; the gradient also collects the relations where they
    sit at the other end or at the apex, and the path through mu_s (two scalar all-reduces). The returned
    value is world_size * (rows' share of L); the DDP average of the gradients is the gradient of L.
    Memory: O(b * B^2) per rank for the angles (B = global batch). Statistics: dist_loss, angle_loss.
    """

    compares_instances = False

    def __init__(self, w_d=25.0, w_a=50.0, normalize=False):
        super().__init__()
        if float(w_d) < 0 or float(w_a) < 0:
            raise ConfigError(f"KD loss 'rkd': w_d and w_a must be >= 0, got w_d={w_d}, w_a={w_a}")
        self.w_d, self.w_a, self.normalize = float(w_d), float(w_a), bool(normalize)

    def forward(self, batch: KDBatch) -> KDOutput:
        dtype = compute_dtype(batch.student)
        s_local = batch.student.to(dtype)
        s_all = all_gather_nograd(batch.student.detach().to(dtype))
        t_local = batch.teacher.detach().to(dtype)
        t_all = batch.gathered_teacher().to(dtype)
        if self.normalize:
            s_local, s_all = F.normalize(s_local, dim=1), F.normalize(s_all, dim=1)
            t_local, t_all = F.normalize(t_local, dim=1), F.normalize(t_all, dim=1)
        n = s_all.shape[0]
        if n < 2:
            zero = s_local.sum() * 0.0
            return KDOutput(loss=zero, stats={"dist_loss": 0.0, "angle_loss": 0.0})
        rows = torch.arange(batch.local_size, device=s_all.device) + batch.offset
        cols = torch.arange(n, device=s_all.device)

        dist_value, dist_grad = self._distance(s_local, s_all, t_local, t_all, rows, cols)
        angle_value, angle_grad = self._angle(s_local, s_all, t_local, t_all, rows, cols)
        value = self.w_d * dist_value + self.w_a * angle_value
        surrogate = self.w_d * dist_grad + self.w_a * angle_grad
        scale = batch.world_size
        loss = scale * (value + surrogate - surrogate.detach())
        return KDOutput(loss=loss, stats={"dist_loss": scale * float(dist_value),
                                          "angle_loss": scale * float(angle_value)})

    @staticmethod
    def _distance(s_local, s_all, t_local, t_all, rows, cols):
        n = s_all.shape[0]
        n_pairs = n * (n - 1)
        pair = (cols[None, :] != rows[:, None]).to(s_local.dtype)               # [b, B], j != i
        off_diag = 1.0 - torch.eye(n, dtype=t_all.dtype, device=t_all.device)
        mu_t = (pair_distance(t_all, t_all) * off_diag).sum() / n_pairs
        d_s = pair_distance(s_local, s_all)                                      # live in s_local
        mu_s = all_reduce_sum((d_s.detach() * pair).sum()) / n_pairs
        resid = d_s / mu_s - pair_distance(t_local, t_all) / mu_t
        value = (huber(resid.detach()) * pair).sum() / n_pairs
        # d L / d mu_s, summed over every pair of the global batch
        dl_dmu = all_reduce_sum((resid.detach().clamp(-1, 1) * (-d_s.detach() / mu_s ** 2) * pair).sum()) / n_pairs
        surrogate = 2 * (huber(resid) * pair).sum() / n_pairs + dl_dmu * 2 * (d_s * pair).sum() / n_pairs
        return value, surrogate

    @staticmethod
    def _angle(s_local, s_all, t_local, t_all, rows, cols):
        n = s_all.shape[0]
        n_triplets = n * (n - 1) ** 2
        not_self = cols[None, :] != rows[:, None]                                # [b, B]
        apex_ok = cols[:, None] != cols[None, :]                                  # [B(j), B(k)]: k != j
        end_mask = (not_self[:, :, None] & apex_ok[None, :, :]).to(s_local.dtype)   # [b, j, k]
        apex_mask = (not_self.t()[:, :, None] & not_self[None, :, :]).to(s_local.dtype)  # [i, b, k]
        end = huber(angle_block(s_local, s_all, s_all) - angle_block(t_local, t_all, t_all)) * end_mask
        apex = huber(angle_block(s_all, s_local, s_all) - angle_block(t_all, t_local, t_all)) * apex_mask
        value = end.detach().sum() / n_triplets
        # a triplet (i, j, k) moves s_i, s_k (twice the end form, by symmetry) and the apex s_j
        surrogate = (2 * end.sum() + apex.sum()) / n_triplets
        return value, surrogate
