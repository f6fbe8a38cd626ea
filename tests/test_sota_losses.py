"""The face-recognition KD methods of the registry (ekd, mrd, adadistill, proxyless): golden values from plain
Python loops (torch.autograd on the loop gives the reference gradient), mining on hand-made angles, the teacher
centres from sharded heads and from the cache, start-up refusals, and engine-level runs."""
import math
import os
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from easydict import EasyDict as edict

from arcface.errors import ConfigError
from arcface.losses import CombinedMarginLoss
from arcface.partial_fc import PartialFC_V2, shard_range
from plugins.ukd import build_kd_loss
from plugins.ukd.batch import KDBatch
from plugins.ukd.composer import KDComposer
from plugins.ukd.losses.adadistill import follow_teacher, occurrence_rank
from plugins.ukd.losses.ekd import select_pairs
from plugins.ukd.losses.mrd import informative_relations
from plugins.ukd.pair_mining import (
    accept_counts,
    fpr_thresholds,
    keep_top_k,
    upper_pairs,
)

DT = torch.float64
LABELS = [0, 0, 1, 1, 2, 2, 3, 4]


@pytest.fixture(autouse=True)
def one_thread():
    """Two OpenMP threads on a shared 2-core machine are many times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_batch(b=8, d=6, seed=0, labels=None, noise=0.8):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, d, generator=g).to(DT)      # float32-exact: KDBatch gathers the teacher in float32
    student = teacher + noise * torch.randn(b, d, generator=g, dtype=DT)
    return student, teacher, torch.tensor(labels if labels is not None else LABELS[:b])


def run_loss(loss, student, teacher, labels, step=0):
    s = student.clone().requires_grad_(True)
    out = loss(KDBatch(student=s, teacher=teacher, labels=labels, step=step))
    out.loss.backward()
    return out, s.grad


def run_loop(fn, student, *args, **kwargs):
    s = student.clone().requires_grad_(True)
    value, extra = fn(s, *args, **kwargs)
    value.backward()
    return value.detach(), s.grad, extra


# ---------------------------------------------------------------- plain-loop references

def dot(u, v):
    return sum(u[k] * v[k] for k in range(len(u)))


def unit(u):
    n = dot(u, u) ** 0.5
    return [u[k] / n for k in range(len(u))]


def clamp(x, lo, hi):
    return min(max(x, lo), hi)


def loop_thresholds(values, fprs):
    """At each FPR f the negative similarity with floor(m f) others above it (m negatives, descending order)."""
    ordered = sorted(values, reverse=True)
    out = []
    for f in fprs:
        p = 0
        while p + 1 <= len(ordered) * f + 1e-9:
            p += 1
        out.append(ordered[min(p, len(ordered) - 1)])
    return out


def loop_ekd(student, teacher, labels, state, fprs, tau, momentum, selection, k_neg, w_pos, w_neg):
    n = len(labels)
    y = [int(v) for v in labels]
    s = [unit(student[i]) for i in range(n)]
    t = [unit(teacher[i]) for i in range(n)]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    s_sim = {p: dot(s[p[0]], s[p[1]]) for p in pairs}
    t_sim = {p: float(dot(t[p[0]], t[p[1]])) for p in pairs}
    negatives = [p for p in pairs if y[p[0]] != y[p[1]]]
    s_now = loop_thresholds([float(s_sim[p].detach()) for p in negatives], fprs)
    t_now = loop_thresholds([t_sim[p] for p in negatives], fprs)
    if state is None:
        s_thr, t_thr = s_now, t_now
    else:
        s_thr = [momentum * a + (1 - momentum) * b for a, b in zip(s_now, state[0])]
        t_thr = [momentum * a + (1 - momentum) * b for a, b in zip(t_now, state[1])]

    def hard_count(x, thr):
        return sum(1 for th in thr if x > th)

    def soft_count(x, thr):
        return sum(1 / (1 + torch.exp(-(x - th) / tau)) if torch.is_tensor(x) else 1 / (1 + math.exp(-(x - th) / tau))
                   for th in thr)

    positives = [p for p in pairs if y[p[0]] == y[p[1]]]
    pool = list(negatives)
    if selection == "critical":
        positives = [p for p in positives if hard_count(float(s_sim[p].detach()), s_thr) < hard_count(t_sim[p], t_thr)]
        pool = [p for p in pool if hard_count(float(s_sim[p].detach()), s_thr) > hard_count(t_sim[p], t_thr)]
    chosen_neg = sorted(pool, key=lambda p: -float(s_sim[p].detach()))[:k_neg]
    loss = student.new_zeros(())
    for group, w in ((positives, w_pos), (chosen_neg, w_neg)):
        if group:
            loss = loss + w * sum((soft_count(s_sim[p], s_thr) - soft_count(t_sim[p], t_thr)) ** 2
                                  for p in group) / len(group)
    return loss, {"thresholds": (s_thr, t_thr), "pos": positives, "neg": chosen_neg}


def loop_mrd(student, teacher, labels, k_neg, positives, form, tau):
    n = len(labels)
    y = [int(v) for v in labels]
    s = [unit(student[i]) for i in range(n)]
    t = [unit(teacher[i]) for i in range(n)]
    total = student.new_zeros(())
    for i in range(n):
        others = [j for j in range(n) if j != i]
        negs = sorted((j for j in others if y[j] != y[i]), key=lambda j: -float(dot(t[i], t[j])))[:k_neg]
        mined = ([j for j in others if y[j] == y[i]] if positives else []) + negs
        if not mined:
            continue
        r_s = [dot(s[i], t[j]) for j in mined]
        r_t = [dot(t[i], t[j]) for j in mined]
        if form == "mse":
            total = total + sum((a - b) ** 2 for a, b in zip(r_s, r_t)) / len(mined)
        else:
            z_p = sum(torch.exp(b / tau) for b in r_t)
            z_q = sum(torch.exp(a / tau) for a in r_s)
            for a, b in zip(r_s, r_t):
                p = torch.exp(b / tau) / z_p
                total = total + p * (torch.log(p) - (a / tau - torch.log(z_q)))
    return total / n, None


def loop_follow_teacher(centres, class_start, student, teacher, labels, hard_weighting):
    table = [[float(x) for x in row] for row in centres]
    for k in range(len(labels)):
        r = int(labels[k]) - class_start
        if not 0 <= r < len(table):
            continue
        s = unit([float(x) for x in student[k]])
        t = unit([float(x) for x in teacher[k]])
        w = table[r]
        cos_st = clamp(dot(s, t), -1.0, 1.0)
        if hard_weighting:
            a = clamp(cos_st * clamp(dot(w, t) / dot(w, w) ** 0.5, 1e-6, 1.0), 1e-6, 1.0)
        else:
            a = clamp(cos_st, 1e-6, 1.0)
        table[r] = [a * w[q] + (1 - a) * t[q] for q in range(len(w))]
    return torch.tensor(table, dtype=DT)


def loop_cosface_ce(student, centres, labels, s, m):
    """Mean over samples of -log softmax of s * (cos - m [target]) against every (normalised) centre."""
    n = len(labels)
    total = student.new_zeros(())
    c = [unit(row) for row in centres.tolist()]
    for i in range(n):
        e = unit(student[i])
        logits = [s * (dot(e, c[k]) - (m if k == int(labels[i]) else 0.0)) for k in range(len(c))]
        total = total + torch.log(sum(torch.exp(z) for z in logits)) - logits[int(labels[i])]
    return total / n


# ---------------------------------------------------------------- ekd

EKD_CASES = {
    "critical": {"fprs": [0.3, 0.1, 0.05], "tau": 0.05, "momentum": 0.3, "selection": "critical", "k_neg": 6,
                     "w_pos": 0.02, "w_neg": 0.01},
    "hard": {"fprs": [0.2, 0.04], "tau": 0.1, "momentum": 0.01, "selection": "hard", "k_neg": 5, "w_pos": 2.0, "w_neg": 1.0},
    "critical_all_negatives": {"fprs": [0.5, 0.2, 0.1, 0.05], "tau": 0.2, "momentum": 0.5, "selection": "critical",
                                   "k_neg": None, "w_pos": 1.0, "w_neg": 1.0},
}


@pytest.mark.parametrize("case", list(EKD_CASES))
def test_ekd_matches_plain_loop_over_two_steps(case):
    params = EKD_CASES[case]
    loss = build_kd_loss("ekd", **params)
    state = None
    selected = 0
    for step, seed in enumerate((0, 1)):
        student, teacher, labels = make_batch(seed=seed, noise=1.2)
        out, grad = run_loss(loss, student, teacher, labels, step=step)
        ref, ref_grad, extra = run_loop(loop_ekd, student, teacher, labels, state, **params)
        torch.testing.assert_close(out.loss.detach(), ref)
        torch.testing.assert_close(grad, ref_grad)
        s_thr, t_thr = extra["thresholds"]
        torch.testing.assert_close(loss.s_thresholds, torch.tensor(s_thr, dtype=DT))
        torch.testing.assert_close(loss.t_thresholds, torch.tensor(t_thr, dtype=DT))
        assert out.stats["pos_pairs"] == len(extra["pos"]) and out.stats["neg_pairs"] == len(extra["neg"])
        selected += len(extra["pos"]) + len(extra["neg"])
        state = extra["thresholds"]
    assert selected > 0 and grad.abs().sum() > 0


def angles(degrees):
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees], dtype=DT)


def test_ekd_picks_exactly_the_critical_pairs_on_hand_made_angles():
    """Teacher at 0/10/85/100 degrees, student at 0/80/60/75, identities [0, 0, 1, 1], one operating point at
    FPR 0.25 (the 2nd largest of 4 negatives): the teacher's threshold is cos 85 (pair (0, 2)), the student's
    cos 20 (pair (1, 2)). The teacher accepts both positives and the negative (1, 2); the student accepts the
    positive (2, 3) and the negative (1, 3). Critical: positive (0, 1) (lost) and negative (1, 3) (extra)."""
    teacher, student = angles([0, 10, 85, 100]), angles([0, 80, 60, 75])
    labels = torch.tensor([0, 0, 1, 1])
    first, second, same = upper_pairs(labels)
    pairs = list(zip(first.tolist(), second.tolist()))
    s_pair = (student @ student.t())[first, second]
    t_pair = (teacher @ teacher.t())[first, second]
    s_thr, t_thr = fpr_thresholds(s_pair[~same], [0.25]), fpr_thresholds(t_pair[~same], [0.25])
    assert float(t_thr[0]) == pytest.approx(math.cos(math.radians(85)))
    assert float(s_thr[0]) == pytest.approx(math.cos(math.radians(20)))
    pos, neg = select_pairs(s_pair, t_pair, same, s_thr, t_thr, "critical", None)
    assert [pairs[k] for k in torch.nonzero(pos).view(-1)] == [(0, 1)]
    assert [pairs[k] for k in torch.nonzero(neg).view(-1)] == [(1, 3)]
    pos, neg = select_pairs(s_pair, t_pair, same, s_thr, t_thr, "hard", 2)   # TFace: all positives, top-2 by student
    assert [pairs[k] for k in torch.nonzero(pos).view(-1)] == [(0, 1), (2, 3)]
    assert [pairs[k] for k in torch.nonzero(neg).view(-1)] == [(1, 2), (1, 3)]
    # the loss itself, fed those embeddings, mines the same pairs on its first step
    out = build_kd_loss("ekd", fprs=[0.25])(KDBatch(student=student, teacher=teacher, labels=labels))
    assert (out.stats["pos_pairs"], out.stats["neg_pairs"]) == (1.0, 1.0)


def test_pair_mining_helpers_on_hand_made_values():
    negatives = torch.tensor([0.1, 0.9, 0.3, 0.5, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0])
    # 10 negatives: FPR 0.1 -> one above (0.8), 0.3 -> three above (0.6), 0.05 -> none above (0.9)
    torch.testing.assert_close(fpr_thresholds(negatives, [0.1, 0.3, 0.05]), torch.tensor([0.8, 0.6, 0.9]))
    assert accept_counts(torch.tensor([0.95, 0.7, 0.5]), torch.tensor([0.8, 0.6, 0.9])).tolist() == [3, 1, 0]
    mask = torch.tensor([True, False, True, True, True])
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7])
    assert keep_top_k(scores, mask, 2).tolist() == [False, False, True, False, True]
    assert keep_top_k(scores, mask, None).tolist() == mask.tolist()


def test_ekd_refuses_bad_parameters_naming_them():
    with pytest.raises(ConfigError, match=r"kd.losses.ekd: .*fprs.*\(0, 1\).*1.5"):
        KDComposer({"ekd": {"weight": 1.0, "fprs": [1e-2, 1.5]}})
    for bad in ([0.0], [1.0], [-1e-3], [], "1e-3", [True]):
        with pytest.raises(ConfigError, match="fprs"):
            build_kd_loss("ekd", fprs=bad)
    with pytest.raises(ConfigError, match="selection"):
        build_kd_loss("ekd", selection="critcal")
    with pytest.raises(ConfigError, match="tau"):
        build_kd_loss("ekd", tau=0)
    with pytest.raises(ConfigError, match="momentum"):
        build_kd_loss("ekd", momentum=1.5)
    with pytest.raises(ConfigError, match="k_neg"):
        build_kd_loss("ekd", k_neg=0)


def test_ekd_thresholds_are_saved_and_restored():
    spec = {"ekd": {"weight": 1.0, "fprs": [0.2, 0.05], "momentum": 0.5}}
    composer = KDComposer(spec)
    student, teacher, labels = make_batch(seed=3)
    composer(KDBatch(student=student, teacher=teacher, labels=labels))
    fresh = KDComposer(spec)
    fresh.load_state_dict(composer.state_dict())
    assert bool(fresh.terms["ekd"].seen) and torch.equal(fresh.terms["ekd"].t_thresholds,
                                                         composer.terms["ekd"].t_thresholds)
    student, teacher, labels = make_batch(seed=4)
    a, _ = composer(KDBatch(student=student, teacher=teacher, labels=labels, step=1))
    b, _ = fresh(KDBatch(student=student, teacher=teacher, labels=labels, step=1))
    assert torch.equal(a["ekd"], b["ekd"])
    assert torch.equal(composer.terms["ekd"].s_thresholds, fresh.terms["ekd"].s_thresholds)


# ---------------------------------------------------------------- mrd

MRD_CASES = {
    "mse": {"k_neg": 3, "positives": True, "form": "mse", "tau": 0.05},
    "kl": {"k_neg": 4, "positives": True, "form": "kl", "tau": 0.2},
    "negatives_only": {"k_neg": 2, "positives": False, "form": "mse", "tau": 0.05},
    "kl_all_negatives": {"k_neg": 100, "positives": False, "form": "kl", "tau": 0.5},
}


@pytest.mark.parametrize("case", list(MRD_CASES))
def test_mrd_matches_plain_loop(case):
    student, teacher, labels = make_batch(seed=5)
    out, grad = run_loss(build_kd_loss("mrd", **MRD_CASES[case]), student, teacher, labels)
    ref, ref_grad, _ = run_loop(loop_mrd, student, teacher, labels, **MRD_CASES[case])
    torch.testing.assert_close(out.loss.detach(), ref)
    torch.testing.assert_close(grad, ref_grad)
    assert grad.abs().sum() > 0


def test_mrd_mines_the_teachers_nearest_other_identities():
    """Teacher features at 0, 5, 20, 45 and 170 degrees, identities [0, 0, 1, 2, 3], k_neg = 2: each anchor keeps
    the two other-identity samples closest in angle, and its same-identity samples."""
    teacher = angles([0, 5, 20, 45, 170])
    labels = torch.tensor([0, 0, 1, 2, 3])
    anchors = torch.arange(5)

    def rows(mask):
        return [sorted(torch.nonzero(mask[i]).view(-1).tolist()) for i in range(mask.shape[0])]

    pos, neg = informative_relations(teacher @ teacher.t(), labels, anchors, 2, True)
    assert rows(pos) == [[1], [0], [], [], []]
    # 0: 20 and 45 beat 170; 5: the same; 20: 5 (15 away) and 0 (20); 45: 20 (25) and 5 (40); 170: 45 and 20
    assert rows(neg) == [[2, 3], [2, 3], [0, 1], [1, 2], [2, 3]]
    pos, neg = informative_relations((teacher @ teacher.t())[3:], labels, anchors[3:], 1, False)
    assert rows(pos) == [[], []] and rows(neg) == [[2], [3]]


def test_mrd_refuses_bad_parameters():
    with pytest.raises(ConfigError, match="form"):
        build_kd_loss("mrd", form="l1")
    with pytest.raises(ConfigError, match="k_neg"):
        build_kd_loss("mrd", k_neg=-1)
    with pytest.raises(ConfigError, match="no relation"):
        build_kd_loss("mrd", k_neg=0, positives=False)
    with pytest.raises(ConfigError, match="projector"):
        build_kd_loss("mrd")(KDBatch(student=torch.randn(4, 3), teacher=torch.randn(4, 5),
                                     labels=torch.arange(4)))


def test_coupleface_objective_is_fc_plus_mrd():
    """The documented CoupleFace example: both terms, each weighted, summed by the composer."""
    spec = {"fc": {"weight": 1.0}, "mrd": {"weight": 10.0, "k_neg": 3}}
    student, teacher, labels = make_batch(seed=6)
    terms, _ = KDComposer(spec)(KDBatch(student=student, teacher=teacher, labels=labels))
    fc = float(sum(1 - F.cosine_similarity(student, teacher)) / len(labels))
    mrd, _ = loop_mrd(student, teacher, labels, 3, True, "mse", 0.05)
    assert float(terms["fc"]) == pytest.approx(fc, rel=1e-9)
    assert float(terms["mrd"]) == pytest.approx(10.0 * float(mrd), rel=1e-9)


def test_the_documented_coupleface_example_builds_fc_plus_mrd():
    import ast
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    code = re.search(r"```python\n# CoupleFace: FCD \+ MRD\n(.*?)```", text, re.DOTALL).group(1)
    assert 'config.sampler = "pk"' in code
    losses = ast.literal_eval(re.search(r"config\.kd\.losses = (\{.*\})", code).group(1))
    composer = KDComposer(losses)
    assert composer.loss_names == {"fc": "fc", "mrd": "mrd"} and composer.weights["mrd"] > 0


# ---------------------------------------------------------------- adadistill

def test_occurrence_rank_counts_earlier_repeats():
    assert occurrence_rank(torch.tensor([3, 1, 3, 3, 0, 1])).tolist() == [0, 0, 1, 2, 0, 1]
    assert occurrence_rank(torch.tensor([5])).tolist() == [0]


@pytest.mark.parametrize("hard_weighting", [True, False])
@pytest.mark.parametrize("class_start,num_local", [(0, 7), (3, 4)])
def test_adadistill_update_is_the_sequential_ema_in_batch_order(hard_weighting, class_start, num_local):
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([3, 0, 3, 5, 6, 3, 0, 2, 5, 6, 1, 3])       # P x K-like: classes repeat up to 4 times
    teacher = torch.randn(12, 5, generator=g, dtype=DT)
    student = teacher + 0.6 * torch.randn(12, 5, generator=g, dtype=DT)
    centres = torch.randn(num_local, 5, generator=g, dtype=DT)
    centres[0] = F.normalize(teacher[1], dim=0) * 0.3 + 0.01           # a centre already near its teacher
    expected = loop_follow_teacher(centres, class_start, student, teacher, labels, hard_weighting)
    table = centres.clone()
    stats = follow_teacher(table, class_start, F.normalize(student, dim=1), F.normalize(teacher, dim=1), labels,
                           hard_weighting)
    torch.testing.assert_close(table, expected)
    owned = int(((labels >= class_start) & (labels < class_start + num_local)).sum())
    assert stats["updates"] == owned and 0 < stats["alpha"] <= 1
    untouched = [r for r in range(num_local) if r + class_start not in labels.tolist()]
    for r in untouched:
        assert torch.equal(table[r], centres[r])


def head(num_classes=7, dim=5, margin=(1.0, 0.0, 0.35), s=16.0):
    return PartialFC_V2(CombinedMarginLoss(s, *margin), dim, num_classes, 1.0)


def test_adadistill_through_partial_fc_matches_the_loop_objective():
    """The whole objective: centres updated in before_head, then the margin softmax (CosFace, s=16, m=0.35) of
    the student against them; loss and gradient from the loop, the centres frozen."""
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([3, 0, 3, 5, 6, 3, 0, 2])
    teacher = torch.randn(8, 5, generator=g)
    student = (teacher + 0.6 * torch.randn(8, 5, generator=g)).requires_grad_(True)
    pfc = head()
    init = torch.randn(7, 5, generator=g)
    pfc.weight.data.copy_(init)
    loss = build_kd_loss("adadistill")
    loss.configure_head(pfc)
    assert not pfc.weight.requires_grad
    batch = KDBatch(student=student, teacher=teacher, labels=labels)
    term = loss(batch)
    loss.before_head(pfc, batch)
    expected_centres = loop_follow_teacher(init.to(DT), 0, student.detach().to(DT), teacher.to(DT), labels, True)
    torch.testing.assert_close(pfc.weight.detach().to(DT), expected_centres, rtol=1e-5, atol=1e-6)
    ce = pfc(student, labels)
    ce.backward()
    s64 = student.detach().to(DT).requires_grad_(True)
    ref = loop_cosface_ce(s64, expected_centres, labels, 16.0, 0.35)
    ref.backward()
    assert float(ce) == pytest.approx(float(ref), rel=1e-5)
    torch.testing.assert_close(student.grad.to(DT), s64.grad, rtol=1e-4, atol=1e-6)
    assert pfc.weight.grad is None
    assert float(term.loss) == 0.0
    assert set(loss(batch).stats) == {"alpha", "lambda", "updates", "cos_st"}


def kd_cfg(losses, **kd):
    section = edict(losses=losses, teacher_embedding_size=16, projector="auto")
    section.update(kd)
    return edict(embedding_size=16, kd=section)


@pytest.mark.parametrize("name,params", [("adadistill", {}), ("proxyless", {"teacher_cache": "unused.tcache"})])
def test_head_losses_accept_only_weight_one(name, params):
    loss = build_kd_loss(name, **params)
    loss.head = object()
    ctx = types.SimpleNamespace(cfg=kd_cfg({name: {"weight": 2.0, **params}}), train_loader=None)
    with pytest.raises(ConfigError, match=rf"kd.losses.{name}: .*weight=1.0.*got weight=2.0"):
        loss.bind_training(ctx)
    ctx.cfg = kd_cfg({"ablation": {"loss": name, "weight": 1.0, "ramp_steps": 10, **params}})
    with pytest.raises(ConfigError, match="kd.losses.ablation: .*ramp_steps=10"):
        loss.bind_training(ctx)


def test_adadistill_refuses_a_projector_and_other_sizes():
    loss = build_kd_loss("adadistill")
    loss.configure_head(head(dim=16))
    for kd in ({"teacher_embedding_size": 32}, {"projector": "linear"}):
        ctx = types.SimpleNamespace(cfg=kd_cfg({"adadistill": {"weight": 1.0}}, **kd))
        with pytest.raises(ConfigError, match="embedding_size == kd.teacher_embedding_size and no projector"):
            loss.bind_training(ctx)
    with pytest.raises(ConfigError, match="16-d class centres towards 8-d"):
        loss.before_head(loss.head, KDBatch(student=torch.randn(4, 8), teacher=torch.randn(4, 8),
                                            labels=torch.arange(4)))


# ---------------------------------------------------------------- proxyless: teacher centres

def write_shards(folder, table, world, ours=False):
    """A teacher run's checkpoint_gpu_<rank>.pt files: its Partial FC table split as shard_range does."""
    os.makedirs(folder, exist_ok=True)
    for rank in range(world):
        start, rows = shard_range(table.shape[0], rank, world)
        state = {"epoch": 1, "global_step": 10, "state_dict_backbone": {},
                 "state_dict_softmax_fc": {"weight": table[start:start + rows].clone()}, "state_optimizer": {}}
        if ours:
            state.update(world_size=world, num_classes=table.shape[0])
        torch.save(state, os.path.join(folder, f"checkpoint_gpu_{rank}.pt"))
    return str(folder)


def fake_head(num_classes, dim, rank, world):
    """This rank's view of Partial FC without a process group: the attributes the head hooks read."""
    start, rows = shard_range(num_classes, rank, world)
    return types.SimpleNamespace(weight=torch.nn.Parameter(torch.zeros(rows, dim)), class_start=start,
                                 num_local=rows, num_classes=num_classes, embedding_size=dim)


@pytest.mark.parametrize("teacher_world,ours", [(2, False), (3, True), (1, False)])
def test_proxyless_loads_each_rank_its_shard_from_any_teacher_world_size(tmp_path, teacher_world, ours):
    table = torch.randn(7, 5)
    folder = write_shards(tmp_path / "teacher", table, teacher_world, ours)
    one = head(num_classes=7, dim=5)                                   # a 1-rank run: the whole table
    build_kd_loss("proxyless", teacher_head=folder).configure_head(one)
    assert torch.equal(one.weight.detach(), table) and not one.weight.requires_grad
    for world in (2, 3):                                               # and back: each rank its rows only
        parts = []
        for rank in range(world):
            h = fake_head(7, 5, rank, world)
            build_kd_loss("proxyless", teacher_head=folder).configure_head(h)
            parts.append(h.weight.detach())
        assert torch.equal(torch.cat(parts), table)


def test_proxyless_refuses_heads_that_do_not_fit(tmp_path):
    table = torch.randn(8, 5)
    folder = write_shards(tmp_path / "t", table, 2)

    def configure(h, path=folder):
        build_kd_loss("proxyless", teacher_head=str(path)).configure_head(h)

    with pytest.raises(ConfigError, match="8 class centres but num_classes is 9"):
        configure(head(num_classes=9, dim=5))
    with pytest.raises(ConfigError, match="5-d centres but the student's embedding_size is 6"):
        configure(head(num_classes=8, dim=6))
    os.remove(os.path.join(folder, "checkpoint_gpu_1.pt"))
    write_shards(tmp_path / "t3", table, 3)
    os.remove(os.path.join(tmp_path / "t3", "checkpoint_gpu_1.pt"))
    with pytest.raises(ConfigError, match=r"do not tile the classes: found ranks \[0, 2\]"):
        configure(head(num_classes=8, dim=5), tmp_path / "t3")
    uneven = tmp_path / "uneven"                                      # 5 + 3 rows: shard_range puts 4 + 4
    os.makedirs(uneven)
    for rank, rows in enumerate((table[:5], table[5:])):
        torch.save({"state_dict_softmax_fc": {"weight": rows}}, uneven / f"checkpoint_gpu_{rank}.pt")
    with pytest.raises(ConfigError, match="holds 5 rows, but 8 classes over 2 shards put 4 on rank 0"):
        configure(head(num_classes=8, dim=5), uneven)
    torch.save({"state_dict_softmax_fc": {"weight": table[:4]}, "world_size": 4},
               uneven / "checkpoint_gpu_0.pt")
    with pytest.raises(ConfigError, match="run of 4 processes but .* holds 2 shards"):
        configure(head(num_classes=8, dim=5), uneven)
    empty = tmp_path / "empty"
    os.makedirs(empty)
    with pytest.raises(ConfigError, match="no checkpoint_gpu_<rank>.pt"):
        configure(head(num_classes=8, dim=5), empty)
    torch.save({"weight": table}, empty / "checkpoint_gpu_0.pt")   # a bare state dict, not a run checkpoint
    with pytest.raises(ConfigError, match="no Partial FC shard"):
        configure(head(num_classes=8, dim=5), empty)
    with pytest.raises(ConfigError, match="exactly one source"):
        build_kd_loss("proxyless")
    with pytest.raises(ConfigError, match="exactly one source"):
        build_kd_loss("proxyless", teacher_head="a", teacher_cache="b")


# ---------------------------------------------------------------- proxyless from the teacher cache

SIZE, DIM = 16, 16


@pytest.fixture(scope="module")
def cached_world(tmp_path_factory):
    """A small RecordIO set (22 images, 5 identities), a teacher and its embedding cache, built by the project."""
    import io

    from PIL import Image

    from arcface.backbones import get_model
    from arcface.config import base_config, validate
    from arcface.data.packing import write_insightface_rec
    from plugins.ukd import cache as C

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("proxyless_cache")
    rng = np.random.default_rng(0)
    labels = sorted(i % 5 for i in range(22))
    payloads = []
    for _ in labels:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((SIZE, SIZE)).save(buf, "JPEG")
        payloads.append(buf.getvalue())
    write_insightface_rec(tmp / "rec", labels, payloads, image_size=(SIZE, SIZE))
    torch.manual_seed(0)
    torch.save(get_model("r18", num_features=DIM, input_size=SIZE, width=0.25).state_dict(), tmp / "teacher.pt")
    cfg = base_config()
    cfg.update({"rec": str(tmp / "rec"), "num_classes": 5, "network": "mbf", "embedding_size": DIM, "input_size": SIZE,
                    "network_kwargs": {"width": 0.25}, "batch_size": 4, "num_workers": 0, "device": "cpu", "fp16": False,
                    "val_targets": [], "output": str(tmp / "out"), "num_epoch": 1, "warmup_epoch": 0, "frequent": 2,
                    "tensorboard": False, "seed": 7, "lr": 0.01})
    cfg.kd = edict(enabled=True, teacher_network="r18", teacher_weights=str(tmp / "teacher.pt"),
                   teacher_embedding_size=DIM, teacher_network_kwargs={"width": 0.25}, teacher_check=False,
                   teacher_cache=str(tmp / "teacher.tcache"), losses={"fc": {"weight": 1.0}})
    cfg = validate(cfg)
    C.build_teacher_cache(cfg, batch_size=4, chunk_size=8, progress=False)
    return edict(tmp=tmp, cfg=cfg, labels=np.array(labels), cache=str(tmp / "teacher.tcache"))


def loop_cache_centres(cache_path, labels, classes):
    from plugins.ukd.cache.file_format import CacheFile
    cache = CacheFile.open(cache_path)
    out = []
    for c in classes:
        total = [0.0] * cache.dim
        for i in range(len(labels)):
            if int(labels[i]) == c:
                for view in (0, 1):
                    for q in range(cache.dim):
                        total[q] += float(cache.embeddings[i, view, q])
        out.append(unit(total))
    return torch.tensor(out, dtype=torch.float32)


def test_proxyless_centres_from_the_cache_are_each_identitys_normalised_mean(cached_world):
    from arcface.engine.hooks import TrainContext
    cfg = cached_world.cfg
    for world in (1, 2):
        for rank in range(world):
            h = fake_head(5, DIM, rank, world)
            loss = build_kd_loss("proxyless", teacher_cache=cached_world.cache)
            loss.configure_head(h)
            assert not h.weight.requires_grad
            cfg.kd.losses = {"proxyless": {"weight": 1.0, "teacher_cache": cached_world.cache}}
            loader = types.SimpleNamespace(labels=cached_world.labels)
            loss.bind_training(TrainContext(cfg=cfg, backbone=None, device=torch.device("cpu"), rank=rank,
                                            world_size=world, train_loader=loader))
            classes = range(h.class_start, h.class_start + h.num_local)
            torch.testing.assert_close(h.weight.detach(), loop_cache_centres(cached_world.cache, cached_world.labels,
                                                                              classes), rtol=1e-5, atol=1e-6)


def test_proxyless_cache_refusals(cached_world, tmp_path):
    from arcface.engine.hooks import TrainContext
    cfg = edict(cached_world.cfg)
    cfg.kd = edict(cfg.kd)
    cfg.kd.losses = {"proxyless": {"weight": 1.0, "teacher_cache": cached_world.cache}}

    def bind(h, labels, **over):
        c = edict(cfg)
        c.update(over)
        loss = build_kd_loss("proxyless", teacher_cache=cached_world.cache)
        loss.configure_head(h)
        loss.bind_training(TrainContext(cfg=c, backbone=None, device=torch.device("cpu"), rank=0, world_size=1,
                                        train_loader=types.SimpleNamespace(labels=labels)))

    with pytest.raises(ConfigError, match="22 samples but the training loader labels 21"):
        bind(fake_head(5, DIM, 0, 1), cached_world.labels[:21])
    with pytest.raises(ConfigError, match="teacher_cache=.*16-d teacher embeddings.*embedding_size=32"):
        bind(fake_head(5, 32, 0, 1), cached_world.labels)
    with pytest.raises(ConfigError, match="1 class\\(es\\) of this shard have no readable training image.*5"):
        bind(fake_head(6, DIM, 0, 1), cached_world.labels)
    with pytest.raises(ConfigError, match="needs cfg.rec to be a RecordIO folder"):
        bind(fake_head(5, DIM, 0, 1), cached_world.labels, rec="synthetic")


# ---------------------------------------------------------------- engine-level runs

@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny teacher trained by the engine: its model.pt and its sharded head (checkpoint_gpu_0.pt)."""
    from engine_utils import TensorLoader, make_data
    from test_trainer import tiny_cfg

    from arcface.engine.trainer import train
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("sota_teacher")
    images, labels = make_data()
    cfg = tiny_cfg(tmp, network="r18", num_epoch=2)
    train(cfg, TensorLoader(images, labels, 8))
    return cfg.output


def kd_section(teacher_dir, losses):
    return edict(enabled=True, teacher_network="r18", teacher_weights=os.path.join(teacher_dir, "model.pt"),
                 teacher_embedding_size=16, teacher_network_kwargs={"width": 0.25}, teacher_check=False,
                 losses=losses)


def test_adadistill_engine_run_follows_the_teacher_and_resumes_exactly(tmp_path, teacher_run):
    from engine_utils import CrashAfter, TensorLoader, make_data
    from test_trainer import tiny_cfg

    from arcface.backbones import get_model
    from arcface.engine.trainer import train
    images, labels = make_data()
    losses = {"adadistill": {"weight": 1.0}}
    full = tiny_cfg(tmp_path / "full", num_epoch=2, kd=kd_section(teacher_run, losses))
    trainer = train(full, TensorLoader(images, labels, 8))
    centres = trainer.pfc.weight.detach()
    assert not trainer.pfc.weight.requires_grad and trainer.head_hooks
    with open(os.path.join(full.output, "training.log")) as f:
        log = f.read()
    assert "kd/adadistill/alpha" in log and "adadistill(hard_weighting=True)" in log
    # every centre ends nearest to its own identity's mean teacher embedding
    teacher = get_model("r18", num_features=16, input_size=16, width=0.25)
    teacher.load_state_dict(torch.load(os.path.join(teacher_run, "model.pt"), weights_only=True))
    with torch.no_grad():
        t = F.normalize(teacher.eval()(images), dim=1)
    means = F.normalize(torch.stack([t[labels == c].mean(0) for c in range(8)]), dim=1)
    sims = F.normalize(centres, dim=1) @ means.t()
    assert torch.equal(sims.argmax(dim=1), torch.arange(8)) and float(sims.diagonal().min()) > 0.8
    # the centres are saved with the run and restored on resume: an interrupted run ends where the full one does
    part = tiny_cfg(tmp_path / "part", num_epoch=2, save_every_steps=5, kd=kd_section(teacher_run, losses))
    with pytest.raises(KeyboardInterrupt):
        train(part, CrashAfter(TensorLoader(images, labels, 8), 7))
    part.resume = True
    resumed = train(part, TensorLoader(images, labels, 8))
    torch.testing.assert_close(resumed.pfc.weight.detach(), centres, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="kd.losses.adadistill: .*weight=1.0"):
        train(tiny_cfg(tmp_path / "bad", kd=kd_section(teacher_run, {"adadistill": {"weight": 3.0}})),
              TensorLoader(images, labels, 8))


def test_proxyless_engine_run_trains_against_the_frozen_teacher_head(tmp_path, teacher_run):
    from engine_utils import TensorLoader, make_data
    from test_trainer import tiny_cfg

    from arcface.engine.trainer import train
    images, labels = make_data()
    teacher_head = torch.load(os.path.join(teacher_run, "checkpoint_gpu_0.pt"),
                              weights_only=False)["state_dict_softmax_fc"]["weight"]
    losses = {"proxyless": {"weight": 1.0, "teacher_head": teacher_run}, "fc": {"weight": 1.0}}
    cfg = tiny_cfg(tmp_path / "run", num_epoch=2, kd=kd_section(teacher_run, losses))
    trainer = train(cfg, TensorLoader(images, labels, 8))
    assert torch.equal(trainer.pfc.weight.detach(), teacher_head)            # loaded, and never moved
    history = [loss for _, loss in trainer.history]
    assert sum(history[-4:]) < sum(history[:4])
    with pytest.raises(ConfigError, match="8 class centres but num_classes is 9"):
        train(tiny_cfg(tmp_path / "bad", num_classes=9, kd=kd_section(teacher_run, losses)),
              TensorLoader(images, labels, 8))


def test_proxyless_engine_run_from_the_cache(cached_world, tmp_path):
    from arcface.engine.trainer import train
    cfg = edict(cached_world.cfg)
    cfg.kd = edict(cfg.kd)
    cfg.output = str(tmp_path / "run")
    cfg.kd.teacher_backend = "cache"
    cfg.kd.losses = {"proxyless": {"weight": 1.0, "teacher_cache": cached_world.cache}}
    trainer = train(cfg)
    expected = loop_cache_centres(cached_world.cache, cached_world.labels, range(5))
    torch.testing.assert_close(trainer.pfc.weight.detach(), expected, rtol=1e-5, atol=1e-6)
    assert trainer.global_step == 22 // 4
