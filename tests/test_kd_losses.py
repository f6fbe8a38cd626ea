"""Golden values for every KD loss: each is recomputed here by a plain Python loop over samples, pairs and
triplets (no vectorisation, textbook formulas), and torch.autograd on that loop gives the reference
gradient with respect to the student embeddings. Plus mining, registry and composer behaviour."""
import math

import pytest
import torch

from arcface.errors import ConfigError
from plugins.ukd import KD_LOSSES, build_kd_loss
from plugins.ukd import losses as _losses  # noqa: F401  (registers the losses)
from plugins.ukd.batch import KDBatch
from plugins.ukd.composer import KDComposer
from plugins.ukd.mining import (hard_count, hard_mask_std, hard_mask_topk, hard_negative_mask, hash_uniform,
                                negative_candidates, positive_mask, random_negative_mask)

DT = torch.float64
LABELS = [0, 0, 1, 1, 2, 2, 3, 4]


def make_batch(b=8, d=6, seed=0, labels=None, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    # float32-exact teacher values: KDBatch gathers the teacher in float32
    teacher = (torch.randn(b, d, generator=g) * scale).to(DT)
    student = (teacher + 0.8 * torch.randn(b, d, generator=g, dtype=DT)) * scale
    labels = torch.tensor(labels if labels is not None else LABELS[:b])
    return student, teacher, labels


def run_loss(loss, student, teacher, labels, step=0):
    s = student.clone().requires_grad_(True)
    out = loss(KDBatch(student=s, teacher=teacher, labels=labels, step=step))
    out.loss.backward()
    return out, s.grad


def run_loop(fn, student, *args):
    s = student.clone().requires_grad_(True)
    value = fn(s, *args)
    value.backward()
    return value.detach(), s.grad


# ---------------------------------------------------------------- plain-loop references

def dot(u, v):
    return sum(u[k] * v[k] for k in range(len(u)))


def norm(u):
    return torch.sqrt(dot(u, u))


def unit(u):
    n = norm(u)
    return [u[k] / n for k in range(len(u))]


def sub(u, v):
    return [u[k] - v[k] for k in range(len(u))]


def huber(x):
    return 0.5 * x * x if abs(float(x.detach())) < 1 else abs(x) - 0.5


def loop_distance(s, t, distance):
    if distance == "cosine":
        return 1 - dot(s, t) / (norm(s) * norm(t))
    sq = sum((s[k] - t[k]) ** 2 for k in range(len(s)))
    return 0.5 * sq if distance == "l2sq" else sq / len(s)


def loop_iled(student, teacher, ratio, beta, mode, kappa, distance):
    n = len(student)
    d = [loop_distance(student[i], teacher[i], distance) for i in range(n)]
    values = [float(x.detach()) for x in d]
    if mode == "topk":
        order = sorted(range(n), key=lambda i: -values[i])
        hard = set(order[:math.ceil(ratio * n)])
    else:
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
        hard = {i for i in range(n) if values[i] > mean + kappa * std}
    w = [1 + beta * (i in hard) for i in range(n)]
    return sum(w[i] * d[i] for i in range(n)) / sum(w)


def loop_fc(student, teacher):
    n = len(student)
    return sum(1 - dot(unit(student[i]), unit(teacher[i])) for i in range(n)) / n


def loop_l2(student, teacher):
    n, d = student.shape
    return sum((student[i][k] - teacher[i][k]) ** 2 for i in range(n) for k in range(d)) / (n * d)


def loop_sp(student, teacher):
    n = len(student)
    s = [unit(student[i]) for i in range(n)]
    t = [unit(teacher[i]) for i in range(n)]
    return sum((dot(s[i], s[j]) - dot(t[i], t[j])) ** 2 for i in range(n) for j in range(n)) / n ** 2


def loop_rkd(student, teacher, w_d, w_a, normalize):
    n = len(student)
    s = [unit(student[i]) if normalize else student[i] for i in range(n)]
    t = [unit(teacher[i]) if normalize else teacher[i] for i in range(n)]
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    mu_s = sum(norm(sub(s[i], s[j])) for i, j in pairs) / len(pairs)
    mu_t = sum(norm(sub(t[i], t[j])) for i, j in pairs) / len(pairs)
    dist = sum(huber(norm(sub(s[i], s[j])) / mu_s - norm(sub(t[i], t[j])) / mu_t) for i, j in pairs) / len(pairs)
    triplets = [(i, j, k) for j in range(n) for i in range(n) for k in range(n) if i != j and k != j]
    angle = 0
    for i, j, k in triplets:
        cos_s = dot(unit(sub(s[i], s[j])), unit(sub(s[k], s[j])))
        cos_t = dot(unit(sub(t[i], t[j])), unit(sub(t[k], t[j])))
        angle = angle + huber(cos_s - cos_t)
    return w_d * dist + w_a * angle / len(triplets)


def loop_rpsd(student, teacher, labels, bank_feats, bank_labels, k_neg, form, tau, w_pos, w_neg):
    """bank_feats/labels: the bank entries in use (valid ones; empty list when the bank is not used)."""
    n = len(student)
    total, n_pos, n_neg = 0, 0, 0
    teacher_units = [unit(teacher[j]) for j in range(n)]
    for i in range(n):
        s_i, t_i = unit(student[i]), teacher_units[i]
        keys = [(teacher_units[j], int(labels[j])) for j in range(n) if j != i]
        keys += [(bank_feats[m], int(bank_labels[m])) for m in range(len(bank_feats))]
        scored = [(dot(t_i, k), dot(s_i, k), label) for k, label in keys]
        positives = [(a, b) for a, b, label in scored if label == int(labels[i])]
        negatives = [(a, b) for a, b, label in scored if label != int(labels[i])]
        negatives = sorted(negatives, key=lambda ab: -float(ab[0].detach()))
        negatives = negatives[:k_neg]
        n_pos, n_neg = n_pos + len(positives), n_neg + len(negatives)
        mined = [(a, b, w_pos) for a, b in positives] + [(a, b, w_neg) for a, b in negatives]
        if not mined:
            continue
        if form == "mse":
            total = total + sum(w * (b - a) ** 2 for a, b, w in mined) / len(mined)
        else:
            zp = sum(torch.exp(a / tau) for a, _, _ in mined)
            zq = sum(torch.exp(b / tau) for _, b, _ in mined)
            for a, b, w in mined:
                p, q = torch.exp(a / tau) / zp, torch.exp(b / tau) / zq
                total = total + w * (p * torch.log(p / q) - p + q)
    return total / n, n_pos / n, n_neg / n


# ---------------------------------------------------------------- ILED

@pytest.mark.parametrize("distance", ["cosine", "l2sq", "mse"])
@pytest.mark.parametrize("mode,ratio,beta,kappa", [("topk", 0.25, 1.0, 1.0), ("topk", 0.5, 2.0, 1.0),
                                                   ("std", 0.25, 1.5, 0.5)])
def test_iled_golden_value_and_gradient(distance, mode, ratio, beta, kappa):
    student, teacher, labels = make_batch()
    loss = build_kd_loss("iled", ratio=ratio, beta=beta, mode=mode, kappa=kappa, distance=distance)
    out, grad = run_loss(loss, student, teacher, labels)
    ref, ref_grad = run_loop(loop_iled, student, teacher, ratio, beta, mode, kappa, distance)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_iled_statistics_describe_the_hard_set():
    student, teacher, labels = make_batch()
    out, _ = run_loss(build_kd_loss("iled", ratio=0.25), student, teacher, labels)
    d = [float(loop_distance(student[i], teacher[i], "cosine")) for i in range(8)]
    hardest = sorted(d, reverse=True)[:2]
    assert out.stats["hard_frac"] == pytest.approx(2 / 8)
    assert out.stats["d_mean"] == pytest.approx(sum(d) / 8)
    assert out.stats["d_hard_mean"] == pytest.approx(sum(hardest) / 2)


def test_iled_with_beta_zero_is_feature_consistency():
    student, teacher, labels = make_batch()
    iled, _ = run_loss(build_kd_loss("iled", beta=0.0), student, teacher, labels)
    fc, _ = run_loss(build_kd_loss("fc"), student, teacher, labels)
    assert iled.loss.item() == pytest.approx(fc.loss.item(), rel=1e-12)


def test_iled_rejects_bad_settings():
    with pytest.raises(ConfigError, match="ratio"):
        build_kd_loss("iled", ratio=1.5)
    with pytest.raises(ConfigError, match="distance"):
        build_kd_loss("iled", distance="cos")
    with pytest.raises(ConfigError, match="mode"):
        build_kd_loss("iled", mode="top")


def test_one_to_one_losses_refuse_different_dims_with_a_clear_error():
    student = torch.randn(4, 3, requires_grad=True)
    batch = KDBatch(student=student, teacher=torch.randn(4, 5), labels=torch.arange(4))
    for name in ("iled", "fc", "l2", "rpsd"):
        with pytest.raises(ConfigError, match="projector"):
            build_kd_loss(name)(batch)
    for name in ("rkd", "sp"):  # relational: any dims
        assert torch.isfinite(build_kd_loss(name)(batch).loss)


# ---------------------------------------------------------------- baselines

def test_fc_golden_value_and_gradient():
    student, teacher, labels = make_batch()
    out, grad = run_loss(build_kd_loss("fc"), student, teacher, labels)
    ref, ref_grad = run_loop(loop_fc, student, teacher)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_l2_golden_value_and_gradient():
    student, teacher, labels = make_batch(scale=3.0)
    out, grad = run_loss(build_kd_loss("l2"), student, teacher, labels)
    ref, ref_grad = run_loop(loop_l2, student, teacher)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_sp_golden_value_and_gradient_with_different_dims():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(7, 4, generator=g, dtype=DT)
    teacher = torch.randn(7, 6, generator=g).to(DT)
    labels = torch.arange(7)
    out, grad = run_loss(build_kd_loss("sp"), student, teacher, labels)
    ref, ref_grad = run_loop(loop_sp, student, teacher)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("normalize", [False, True])
def test_rkd_golden_value_and_gradient(normalize):
    student, teacher, labels = make_batch(b=6, d=4, seed=5, scale=2.0)
    loss = build_kd_loss("rkd", normalize=normalize)
    out, grad = run_loss(loss, student, teacher, labels)
    ref, ref_grad = run_loop(loop_rkd, student, teacher, 25.0, 50.0, normalize)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-10)
    assert 25.0 * out.stats["dist_loss"] + 50.0 * out.stats["angle_loss"] == pytest.approx(ref.item(), rel=1e-9)


def test_rkd_huber_switches_to_linear_for_large_residuals():
    # Teacher relations far from the student's: residuals beyond 1 exercise the linear branch of the Huber.
    student, teacher, labels = make_batch(b=6, d=4, seed=6)
    teacher = teacher * torch.tensor([8.0, 0.1, 0.1, 0.1], dtype=DT)
    out, grad = run_loss(build_kd_loss("rkd", w_d=1.0, w_a=1.0), student, teacher, labels)
    ref, ref_grad = run_loop(loop_rkd, student, teacher, 1.0, 1.0, False)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------- RPSD

def filled_rpsd(bank_size, n_enqueue, seed=11, **kw):
    loss = build_kd_loss("rpsd", bank=bank_size, **kw)
    g = torch.Generator().manual_seed(seed)
    if n_enqueue:
        feats = torch.randn(n_enqueue, 6, generator=g, dtype=DT)
        labels = torch.randint(0, 6, (n_enqueue,), generator=g)
        loss.after_step(KDBatch(student=feats, teacher=feats, labels=labels))
    return loss


def bank_in_use(loss, min_bank):
    bank = loss.bank
    if bank.dim is None or bank.num_valid() < max(min_bank, 1):
        return [], []
    slots = [m for m in range(bank.size) if bool(bank.valid[m])]
    return [bank.feats[m].to(DT) for m in slots], [int(bank.labels[m]) for m in slots]


@pytest.mark.parametrize("bank_size,n_enqueue,k_neg,min_bank,form,w_pos,w_neg", [
    (10, 14, 4, None, "mse", 1.0, 1.0),    # full bank after wrap-around
    (16, 5, 3, None, "mse", 2.0, 0.5),     # partly filled bank (invalid slots present), used since 5 >= k_neg
    (16, 2, 3, None, "mse", 1.0, 1.0),     # bank below min_bank (= k_neg): in-batch keys only
    (16, 2, 3, 1, "mse", 1.0, 1.0),        # min_bank 1: two bank entries already used
    (10, 14, 4, None, "kl", 1.0, 1.0),
    (16, 5, 3, None, "kl", 1.5, 0.5),
    (10, 14, 100, 4, "mse", 1.0, 1.0),     # k_neg beyond the number of negatives: all of them
])
def test_rpsd_golden_value_and_gradient(bank_size, n_enqueue, k_neg, min_bank, form, w_pos, w_neg):
    student, teacher, labels = make_batch()
    loss = filled_rpsd(bank_size, n_enqueue, k_neg=k_neg, min_bank=min_bank, form=form, w_pos=w_pos, w_neg=w_neg,
                       tau=0.05)
    bank_feats, bank_labels = bank_in_use(loss, k_neg if min_bank is None else min_bank)
    out, grad = run_loss(loss, student, teacher, labels)
    s = student.clone().requires_grad_(True)
    ref, n_pos, n_neg = loop_rpsd(s, teacher, labels, bank_feats, bank_labels, k_neg, form, 0.05, w_pos, w_neg)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(grad, s.grad, rtol=1e-8, atol=1e-12)
    assert out.stats["pos_per_anchor"] == pytest.approx(n_pos)
    assert out.stats["neg_per_anchor"] == pytest.approx(n_neg)
    assert out.stats["bank_fill"] == pytest.approx(min(n_enqueue, bank_size) / bank_size)


def test_rpsd_random_negatives_are_extra_other_label_keys_fixed_per_step():
    student, teacher, labels = make_batch()
    loss = filled_rpsd(32, 20, k_neg=2, k_rand=3, min_bank=0)
    out0, _ = run_loss(loss, student, teacher, labels, step=7)
    out1, _ = run_loss(loss, student, teacher, labels, step=7)
    out2, _ = run_loss(loss, student, teacher, labels, step=8)
    assert out0.stats["neg_per_anchor"] == 2 + 3
    assert out0.loss.item() == out1.loss.item()      # same step: same draw
    assert out0.loss.item() != out2.loss.item()      # next step: another draw
    without = filled_rpsd(32, 20, k_neg=2, min_bank=0)
    assert run_loss(without, student, teacher, labels, step=7)[0].loss.item() != out0.loss.item()


def test_rpsd_check_refuses_a_small_bank_and_a_random_sampler():
    loss = build_kd_loss("rpsd", bank=256, k_neg=64)
    with pytest.raises(ConfigError, match="smaller than the global batch"):
        loss.check(global_batch_size=512, pk_sampler=True)
    with pytest.raises(ConfigError, match=r"cfg\.sampler='pk'"):
        loss.check(global_batch_size=128, pk_sampler=False)
    loss.check(global_batch_size=128, pk_sampler=True)
    build_kd_loss("rpsd", bank=256, k_neg=64, require_positives=False).check(128, pk_sampler=False)
    build_kd_loss("rpsd", bank=256, k_neg=64, w_pos=0.0).check(128, pk_sampler=False)
    with pytest.raises(ConfigError, match="min_bank"):
        build_kd_loss("rpsd", bank=100, k_neg=256)
    with pytest.raises(ConfigError, match="form"):
        build_kd_loss("rpsd", form="ce")


def test_rpsd_builds_no_batch_by_keys_by_dim_tensor():
    """Memory sanity: the largest tensor built is [b, keys], never [b, keys, d]."""
    b, d, bank = 16, 32, 4096
    loss = build_kd_loss("rpsd", bank=bank, k_neg=64, k_rand=8)
    feats = torch.randn(bank, d)
    loss.after_step(KDBatch(student=feats, teacher=feats, labels=torch.randint(0, 500, (bank,))))
    biggest = []
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    biggest.append(t.numel())
            return out

    student = torch.randn(b, d, requires_grad=True)
    with Largest():
        out = loss(KDBatch(student=student, teacher=torch.randn(b, d), labels=torch.randint(0, 500, (b,))))
        out.loss.backward()
    n_keys = bank + b
    assert max(biggest) <= max(b * n_keys, n_keys * d)   # [b, keys] similarities or the [keys, d] key matrix


# ---------------------------------------------------------------- mining

def test_positive_and_hard_negative_mining_pick_the_expected_keys():
    anchor_labels = torch.tensor([7, 3])
    key_labels = torch.tensor([7, 3, 7, 5, 3, 9, 7, 1])
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, 0] = False                       # key 0 is anchor 0 itself
    valid[1, 1] = False                       # key 1 is anchor 1 itself
    valid[:, 7] = False                       # an empty bank slot
    teacher_sim = torch.tensor([[1.0, 0.9, 0.2, 0.8, 0.1, 0.7, 0.3, 0.95],
                                [0.5, 1.0, 0.4, 0.3, 0.6, 0.2, 0.9, 0.99]])
    pos = positive_mask(anchor_labels, key_labels, valid)
    assert pos[0].nonzero().flatten().tolist() == [2, 6]
    assert pos[1].nonzero().flatten().tolist() == [4]
    cand = negative_candidates(anchor_labels, key_labels, valid)
    neg = hard_negative_mask(teacher_sim, cand, k=2)
    assert neg[0].nonzero().flatten().tolist() == [1, 3]       # 0.9, 0.8 (self 1.0 and empty slot 0.95 excluded)
    assert neg[1].nonzero().flatten().tolist() == [0, 6]       # 0.5, 0.9
    everything = hard_negative_mask(teacher_sim, cand, k=10)   # more than exist: all candidates
    assert torch.equal(everything, cand)


def test_hard_instance_mining():
    d = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.5, 0.4, 0.6, 0.05])
    assert hard_mask_topk(d, 0.3).nonzero().flatten().tolist() == [1, 3, 5]
    assert hard_count(0.1, 30) == 3 and hard_count(0.25, 6) == 2 and hard_count(0.0, 8) == 0
    mean, std = d.mean().item(), d.std(correction=0).item()
    expected = [i for i, v in enumerate(d.tolist()) if v > mean + 0.5 * std]
    assert hard_mask_std(d, 0.5).nonzero().flatten().tolist() == expected


def test_random_negatives_are_deterministic_uniform_and_rank_independent():
    cand = torch.rand(6, 50, generator=torch.Generator().manual_seed(0)) > 0.3
    rows = torch.arange(6)
    first = random_negative_mask(cand, 4, seed=1, step=3, rows=rows)
    assert torch.equal(first, random_negative_mask(cand, 4, seed=1, step=3, rows=rows))
    assert not torch.equal(first, random_negative_mask(cand, 4, seed=1, step=4, rows=rows))
    assert not (first & ~cand).any() and first.sum(1).tolist() == [4] * 6
    # rows 3..5 drawn on their own (as rank 1 of 2 would) pick what they picked in the full batch
    assert torch.equal(random_negative_mask(cand[3:], 4, 1, 3, rows[3:]), first[3:])
    u = hash_uniform(0, 0, torch.arange(200), 500)
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean().item() - 0.5) < 0.01


# ---------------------------------------------------------------- registry and composer

def test_registry_round_trip_and_errors():
    assert set(KD_LOSSES.names()) >= {"iled", "rpsd", "l2", "fc", "rkd", "sp"}
    loss = build_kd_loss("iled", ratio=0.5, beta=2.0)
    assert type(loss).name == "iled" and loss.ratio == 0.5 and loss.beta == 2.0
    assert build_kd_loss("rpsd", bank=2048, k_neg=32).bank.size == 2048
    with pytest.raises(ConfigError, match="did you mean 'iled'"):
        build_kd_loss("ilde")
    with pytest.raises(ConfigError, match="takes no parameter 'k_negs'; did you mean 'k_neg'"):
        build_kd_loss("rpsd", k_negs=10)


def test_composer_weighted_sum_ramp_stats_and_formula():
    spec = {"iled": {"weight": 10.0, "ratio": 0.25}, "fc": {"weight": 2.0, "ramp_steps": 4},
            "rpsd_kl": {"loss": "rpsd", "weight": 1.0, "form": "kl", "bank": 64, "k_neg": 8}}
    composer = KDComposer(spec)
    formula = composer.formula()
    assert formula.startswith("L = L_cls + 10.0 * iled(ratio=0.25, beta=1.0, mode='topk'")
    assert "2.0 * min(1, step/4) * fc()" in formula and "rpsd_kl:rpsd(bank=64, k_neg=8" in formula
    student, teacher, labels = make_batch()
    for step, fc_weight in ((0, 0.0), (1, 0.5), (4, 2.0), (9, 2.0)):
        losses, stats = composer(KDBatch(student=student, teacher=teacher, labels=labels, step=step))
        fc = build_kd_loss("fc")(KDBatch(student=student, teacher=teacher, labels=labels)).loss.item()
        iled = build_kd_loss("iled")(KDBatch(student=student, teacher=teacher, labels=labels)).loss.item()
        assert stats["fc/weight"] == fc_weight and stats["fc"] == pytest.approx(fc)
        assert losses["fc"].item() == pytest.approx(fc_weight * fc)
        assert losses["iled"].item() == pytest.approx(10.0 * iled) and stats["iled/hard_frac"] == 0.25
        assert set(losses) == {"iled", "fc", "rpsd_kl"} and "rpsd_kl/bank_fill" in stats
        composer.after_step(KDBatch(student=student, teacher=teacher, labels=labels, step=step))
    assert stats["rpsd_kl/bank_fill"] == pytest.approx(24 / 64)


def test_composer_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"kd\.losses\.ilde: unknown KD loss 'ilde'; did you mean 'iled'"):
        KDComposer({"ilde": {"weight": 1.0}})
    with pytest.raises(ConfigError, match=r"kd\.losses\.iled: .*takes no parameter 'rato'; did you mean 'ratio'"):
        KDComposer({"iled": {"weight": 1.0, "rato": 0.3}})
    with pytest.raises(ConfigError, match=r"kd\.losses\.fc: missing 'weight'"):
        KDComposer({"fc": {}})
    with pytest.raises(ConfigError, match=r"kd\.losses\.fc\.weight must be a number"):
        KDComposer({"fc": {"weight": "ten"}})
    with pytest.raises(ConfigError, match="non-empty"):
        KDComposer({})
    composer = KDComposer({"rpsd": {"weight": 1.0, "bank": 128, "k_neg": 16}})
    with pytest.raises(ConfigError, match=r"kd\.losses\.rpsd: .*sampler='pk'"):
        composer.check(global_batch_size=64, pk_sampler=False)
    with pytest.raises(ConfigError, match=r"kd\.losses\.rpsd: .*smaller than the global batch"):
        composer.check(global_batch_size=256, pk_sampler=True)
    composer.check(global_batch_size=64, pk_sampler=True)


def test_composer_state_dict_restores_the_banks_into_a_fresh_composer():
    spec = {"rpsd": {"weight": 1.0, "bank": 20, "k_neg": 4}, "iled": {"weight": 1.0}}
    composer = KDComposer(spec)
    student, teacher, labels = make_batch()
    for step in range(3):
        composer.after_step(KDBatch(student=student, teacher=teacher + step, labels=labels + step, step=step))
    fresh = KDComposer(spec)
    fresh.load_state_dict(composer.state_dict())
    for key, value in composer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    batch = KDBatch(student=student, teacher=teacher, labels=labels, step=3)
    assert fresh(batch)[0]["rpsd"].item() == composer(batch)[0]["rpsd"].item()
