"""RPSD's relational forms: student-student similarities against teacher-teacher ones, in the batch and through a
bank that keeps the student's (stale) embedding beside each teacher key; hard and critical (threshold at a FAR)
mining; the one-temperature KL. Golden values and gradients from plain loops, the minimum at student == teacher,
2 processes == 1 process, and the start-up errors."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from arcface.errors import ConfigError
from plugins.ukd import build_kd_loss
from plugins.ukd import losses as _losses  # noqa: F401  (registers the losses)
from plugins.ukd.batch import KDBatch
from plugins.ukd.composer import KDComposer

DT = torch.float64
LABELS = [0, 0, 1, 1, 2, 2, 3, 4]


def make_batch(b=8, d=6, seed=0, noise=0.8):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, d, generator=g).to(DT)          # float32-exact: KDBatch gathers the teacher in float32
    student = teacher + noise * torch.randn(b, d, generator=g, dtype=DT)
    return student, teacher, torch.tensor(LABELS[:b])


def fill_bank(loss, n, seed=11, d=6, index_start=100):
    """after_step on n past samples (teacher, a different student, labels, dataset indices)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, d, generator=g)
    student = teacher + 0.5 * torch.randn(n, d, generator=g)
    labels = torch.randint(0, 6, (n,), generator=g)
    index = torch.arange(index_start, index_start + n)
    loss.after_step(KDBatch(student=student, teacher=teacher, labels=labels, index=index))
    return index


def run_loss(loss, student, teacher, labels, step=0, index=None):
    s = student.clone().requires_grad_(True)
    out = loss(KDBatch(student=s, teacher=teacher, labels=labels, step=step, index=index))
    out.loss.backward()
    return out, s.grad


# ---------------------------------------------------------------- the plain-loop reference

def dot(u, v):
    return sum(u[k] * v[k] for k in range(len(u)))


def unit(u):
    n = torch.sqrt(dot(u, u))
    return [u[k] / n for k in range(len(u))]


def bank_entries(loss, exclude_index=()):
    """The bank entries the loss uses, as (teacher key, student key, label) lists of float64 values."""
    bank = loss.bank
    if bank is None or bank.dim is None or bank.num_valid() < max(loss.min_bank, 1):
        return []
    out = []
    for m in range(bank.size):
        if not bool(bank.valid[m]) or (bank.uses_index and m in exclude_index):
            continue
        s_key = bank.student[m].to(DT) if hasattr(bank, "student") else None
        out.append((list(bank.feats[m].to(DT)), None if s_key is None else list(s_key), int(bank.labels[m])))
    return out


def loop_threshold(teacher_units, labels, keys_per_anchor, far):
    """The teacher's impostor similarity exceeded by a fraction far of all (anchor, other-label key) pairs."""
    values = []
    for i, keys in enumerate(keys_per_anchor):
        values += [float(dot(teacher_units[i], t)) for t, _, label in keys if label != int(labels[i])]
    values.sort(reverse=True)
    m = max(1, math.ceil(far * len(values)))
    return values[m - 1]


def loop_rpsd(student, teacher, labels, bank, k_neg, form, tau, w_pos, w_neg, relation, mining="hard",
              threshold=None, far=1e-4, index=None):
    """(loss, threshold used). Keys of anchor i: the other batch samples (other images: another dataset index when
    given) (teacher, live student, label), then the bank entries (teacher, stored student, label). w_pos = 0: no
    positive is mined."""
    n = len(student)
    s_units = [unit(student[j]) for j in range(n)]
    t_units = [unit(teacher[j]) for j in range(n)]
    keys_per_anchor = []
    for i in range(n):
        keys = [(t_units[j], s_units[j], int(labels[j])) for j in range(n)
                if j != i and (index is None or int(index[j]) != int(index[i]))]
        keys += [(t, s, label) for t, s, label in bank]
        keys_per_anchor.append(keys)
    if mining == "critical" and threshold is None:
        threshold = loop_threshold(t_units, labels, keys_per_anchor, far)
    total = 0
    for i in range(n):
        scored = []
        for t_key, s_key, label in keys_per_anchor[i]:
            a = dot(t_units[i], t_key)
            b = dot(s_units[i], t_key)
            c = dot(s_units[i], s_key) if s_key is not None else None
            scored.append((a, b, c, label))
        positives = [x for x in scored if x[3] == int(labels[i]) and w_pos > 0]
        negatives = [x for x in scored if x[3] != int(labels[i])]
        if mining == "hard":
            negatives.sort(key=lambda x: -float(x[0].detach()))
        else:
            negatives.sort(key=lambda x: abs(float(x[0].detach()) - threshold))
        mined = [(x, w_pos) for x in positives] + [(x, w_neg) for x in negatives[:k_neg]]
        if not mined:
            continue
        per_relation = []
        for which in (("cross", 1), ("student", 2)):
            if relation not in (which[0], "both"):
                continue
            k = which[1]
            if form == "mse":
                per_relation.append(sum(w * (x[k] - x[0]) ** 2 for x, w in mined) / len(mined))
            else:
                zp = sum(torch.exp(x[0] / tau) for x, _ in mined)
                zq = sum(torch.exp(x[k] / tau) for x, _ in mined)
                kl = 0
                for x, w in mined:
                    p, q = torch.exp(x[0] / tau) / zp, torch.exp(x[k] / tau) / zq
                    kl = kl + w * (p * torch.log(p / q) - p + q)
                per_relation.append(kl)
        total = total + sum(per_relation) / len(per_relation)
    return total / n, threshold


# ---------------------------------------------------------------- golden values and gradients

CASES = [
    # relation, form, mining, bank_update, bank, n_past, k_neg, w_pos, w_neg
    ("student", "mse", "hard", "fifo", 0, 0, 3, 1.0, 1.0),        # in-batch pairs only (no bank)
    ("student", "mse", "hard", "fifo", 16, 12, 4, 1.0, 1.0),      # student bank, FIFO
    ("student", "mse", "hard", "fifo", 10, 14, 4, 2.0, 0.5),      # FIFO after wrap-around, weights
    ("student", "kl", "hard", "fifo", 16, 12, 4, 1.0, 1.0),
    ("student", "kl", "hard", "fifo", 16, 12, 4, 1.5, 0.5),       # weighted KL: generalised form
    ("student", "mse", "hard", "momentum", 200, 12, 4, 1.0, 1.0),  # per-sample slots
    ("student", "mse", "critical", "fifo", 16, 12, 3, 1.0, 1.0),
    ("student", "kl", "critical", "momentum", 200, 12, 3, 1.0, 0.5),
    ("both", "mse", "hard", "fifo", 16, 12, 4, 1.0, 1.0),
    ("both", "kl", "critical", "fifo", 16, 12, 4, 1.0, 1.0),
    ("cross", "kl", "hard", "fifo", 16, 12, 4, 1.0, 1.0),         # the old form, now with one temperature
    ("cross", "mse", "critical", "momentum", 200, 12, 4, 1.0, 1.0),
    ("student", "kl", "hard", "fifo", 16, 12, 4, 0.0, 1.0),       # w_pos = 0: positives neither mined nor counted
    ("cross", "mse", "hard", "fifo", 0, 0, 3, 0.0, 1.0),
]


@pytest.mark.parametrize("relation,form,mining,bank_update,bank,n_past,k_neg,w_pos,w_neg", CASES)
def test_golden_value_and_gradient(relation, form, mining, bank_update, bank, n_past, k_neg, w_pos, w_neg):
    student, teacher, labels = make_batch()
    extra = {"far": 0.05} if mining == "critical" else {}
    loss = build_kd_loss("rpsd", bank=bank, k_neg=k_neg, min_bank=1 if bank else None, form=form,
                         relation=relation, mining=mining, bank_update=bank_update, tau=0.07, w_pos=w_pos,
                         w_neg=w_neg, **extra)
    index = torch.arange(8) + 104      # the momentum bank holds older views of samples 104..107: left out
    if n_past:
        fill_bank(loss, n_past)
    entries = bank_entries(loss, exclude_index=set(index.tolist()))
    out, grad = run_loss(loss, student, teacher, labels, index=index)
    s = student.clone().requires_grad_(True)
    ref, threshold = loop_rpsd(s, teacher, labels, entries, k_neg, form, 0.07, w_pos, w_neg, relation, mining,
                               far=0.05)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(grad, s.grad, rtol=1e-8, atol=1e-12)
    if mining == "critical":
        assert out.stats["threshold"] == pytest.approx(threshold, rel=1e-9)
    if bank_update == "momentum" and n_past:
        assert len(entries) == n_past - 8   # samples 104..111 are in the batch: their slots are left out
    if w_pos == 0:
        assert out.stats["pos_per_anchor"] == 0


@pytest.mark.parametrize("relation,form", [("student", "mse"), ("cross", "kl"), ("both", "mse")])
def test_a_repeated_image_is_the_anchor_itself_not_a_positive(relation, form):
    """A P x K batch repeats an image when its identity has fewer than K: the copy is excluded by dataset index."""
    student, teacher, _ = make_batch()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
    index = torch.tensor([5, 5, 7, 8, 9, 9, 10, 11])   # samples 0/1 and 4/5 are one image each, seen twice
    loss = build_kd_loss("rpsd", bank=0, k_neg=3, relation=relation, form=form, tau=0.07)
    out, grad = run_loss(loss, student, teacher, labels, index=index)
    s = student.clone().requires_grad_(True)
    ref, _ = loop_rpsd(s, teacher, labels, [], 3, form, 0.07, 1.0, 1.0, relation, index=index)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(grad, s.grad, rtol=1e-8, atol=1e-12)
    # only identity 1 has a true positive pair (two images): 2 of the 8 anchors have one positive each
    assert out.stats["pos_per_anchor"] == pytest.approx(2 / 8)
    without_index, _ = run_loss(build_kd_loss("rpsd", bank=0, k_neg=3, relation=relation, form=form, tau=0.07),
                                student, teacher, labels)
    assert without_index.stats["pos_per_anchor"] == pytest.approx(6 / 8)


def test_critical_threshold_follows_an_ema_over_steps():
    student, teacher, labels = make_batch()
    loss = build_kd_loss("rpsd", bank=0, k_neg=3, relation="student", mining="critical", far=0.1, far_momentum=0.75)
    first, _ = run_loss(loss, student, teacher, labels)
    student2, teacher2, _ = make_batch(seed=4)
    second, grad = run_loss(loss, student2, teacher2, labels)
    s = student2.clone().requires_grad_(True)
    t1 = first.stats["threshold"]
    t2_batch = loop_rpsd(student2, teacher2, labels, [], 3, "mse", 0.1, 1.0, 1.0, "student", "critical",
                         far=0.1)[1]
    expected = 0.75 * t1 + 0.25 * t2_batch
    assert second.stats["threshold"] == pytest.approx(expected, rel=1e-9)
    ref, _ = loop_rpsd(s, teacher2, labels, [], 3, "mse", 0.1, 1.0, 1.0, "student", "critical", threshold=expected)
    ref.backward()
    assert second.loss.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(grad, s.grad, rtol=1e-8, atol=1e-12)
    # the threshold is state: saved and restored
    fresh = build_kd_loss("rpsd", bank=0, k_neg=3, relation="student", mining="critical", far=0.1,
                          far_momentum=0.75)
    fresh.load_state_dict(loss.state_dict())
    assert float(fresh.threshold) == pytest.approx(expected) and int(fresh.threshold_steps) == 2


def test_critical_threshold_of_a_large_batch_is_read_from_a_fixed_column_subsample(monkeypatch):
    """Above THRESHOLD_TAIL / far impostor pairs, every stride-th key column (batch samples first, then every bank
    slot, valid or not) is used; the plain loop below reads the same columns."""
    from plugins.ukd.losses import rpsd as rpsd_module
    monkeypatch.setattr(rpsd_module, "THRESHOLD_TAIL", 2)
    student, teacher, labels = make_batch()
    loss = build_kd_loss("rpsd", bank=16, k_neg=3, min_bank=1, relation="student", mining="critical", far=0.05)
    fill_bank(loss, 12)
    bank = loss.bank
    columns = [unit(teacher[j]) for j in range(8)] + [list(bank.feats[m].to(DT)) for m in range(16)]
    column_labels = [int(labels[j]) for j in range(8)] + [int(bank.labels[m]) for m in range(16)]
    column_valid = [True] * 8 + [bool(bank.valid[m]) for m in range(16)]
    stride = int(8 * 24 * 0.05 // 2)
    assert stride == 4
    values = []
    for i in range(8):
        t_i = unit(teacher[i])
        for c in range(0, 24, stride):
            if c != i and column_valid[c] and column_labels[c] != int(labels[i]):
                values.append(float(dot(t_i, columns[c])))
    values.sort(reverse=True)
    expected = values[max(1, math.ceil(0.05 * len(values))) - 1]
    out, grad = run_loss(loss, student, teacher, labels)
    assert out.stats["threshold"] == pytest.approx(expected, rel=1e-9)
    s = student.clone().requires_grad_(True)
    ref, _ = loop_rpsd(s, teacher, labels, bank_entries(loss), 3, "mse", 0.1, 1.0, 1.0, "student", "critical",
                       threshold=expected)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(grad, s.grad, rtol=1e-8, atol=1e-12)


def test_critical_mining_takes_the_negatives_around_the_threshold_not_the_hardest():
    student, teacher, labels = make_batch()
    hard = build_kd_loss("rpsd", bank=0, k_neg=2, relation="student")
    critical = build_kd_loss("rpsd", bank=0, k_neg=2, relation="student", mining="critical", far=0.3)
    assert run_loss(hard, student, teacher, labels)[0].loss.item() != \
        pytest.approx(run_loss(critical, student, teacher, labels)[0].loss.item())


# ---------------------------------------------------------------- the minimum is the teacher's relations

def random_rotation(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=DT))
    return q


@pytest.mark.parametrize("form", ["mse", "kl"])
@pytest.mark.parametrize("relation", ["student", "both", "cross"])
@pytest.mark.parametrize("mining,bank_update", [("hard", "fifo"), ("critical", "momentum")])
def test_student_equal_to_teacher_is_a_minimum(form, relation, mining, bank_update):
    """At s = t (bank entries too) every form is 0 with zero gradient; the weights differ on purpose (w_pos != w_neg
    is where a plain weighted KL would not be at its minimum)."""
    _, teacher, labels = make_batch()
    extra = {"far": 0.1} if mining == "critical" else {}
    loss = build_kd_loss("rpsd", bank=200, k_neg=4, min_bank=1, form=form, relation=relation, mining=mining,
                         bank_update=bank_update, w_pos=2.0, w_neg=0.5, **extra)
    g = torch.Generator().manual_seed(5)
    past = torch.randn(12, 6, generator=g)
    loss.after_step(KDBatch(student=past, teacher=past, labels=torch.randint(0, 6, (12,), generator=g),
                            index=torch.arange(100, 112)))
    out, grad = run_loss(loss, teacher.clone(), teacher, labels, index=torch.arange(8))
    assert abs(out.loss.item()) < 1e-12
    assert grad.abs().max().item() < 1e-10
    assert out.stats["pos_per_anchor"] > 0 and out.stats["neg_per_anchor"] == 4


@pytest.mark.parametrize("form", ["mse", "kl"])
def test_a_rotated_teacher_space_satisfies_the_student_relation_but_not_the_cross_one(form):
    """The relational form transfers geometry: any rotation of the teacher's space is a minimum, so a small
    student need not copy the teacher's coordinates. The cross form is an instance loss and is not satisfied."""
    _, teacher, labels = make_batch()
    rotated = teacher @ random_rotation(6, seed=2)
    student_rel = build_kd_loss("rpsd", bank=0, k_neg=4, form=form, relation="student")
    out, grad = run_loss(student_rel, rotated, teacher, labels)
    assert abs(out.loss.item()) < 1e-12 and grad.abs().max().item() < 1e-10
    cross = build_kd_loss("rpsd", bank=0, k_neg=4, form=form, relation="cross")
    assert run_loss(cross, rotated, teacher, labels)[0].loss.item() > 1e-3


def test_the_one_temperature_kl_no_longer_fights_the_instance_losses():
    """The old cross KL (tau_t 0.1, tau_s 0.02) was 2.5 with gradient 1.08 at s = t; one temperature: 0 and 0."""
    _, teacher, labels = make_batch()
    out, grad = run_loss(build_kd_loss("rpsd", bank=0, k_neg=4, form="kl"), teacher.clone(), teacher, labels)
    assert abs(out.loss.item()) < 1e-12 and grad.abs().max().item() < 1e-10


# ---------------------------------------------------------------- the student bank inside RPSD

def test_the_bank_keeps_the_student_beside_the_teacher_and_is_saved():
    loss = build_kd_loss("rpsd", bank=16, k_neg=2, relation="student")
    index = fill_bank(loss, 5)
    t_keys, s_keys, labels = loss.bank.entries()
    assert t_keys.shape == s_keys.shape == (5, 6) and not torch.allclose(t_keys, s_keys)
    fresh = build_kd_loss("rpsd", bank=16, k_neg=2, relation="student")
    fresh.load_state_dict(loss.state_dict())
    assert set(loss.state_dict()) == {"bank.feats", "bank.student", "bank.labels", "bank.valid", "bank.ptr"}
    for key, value in loss.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    student, teacher, y = make_batch()
    assert run_loss(fresh, student, teacher, y)[0].loss.item() == run_loss(loss, student, teacher, y)[0].loss.item()
    momentum = build_kd_loss("rpsd", bank=300, k_neg=2, relation="student", bank_update="momentum")
    fill_bank(momentum, 5, index_start=int(index[0]))
    assert set(momentum.state_dict()) == {"bank.feats", "bank.student", "bank.labels", "bank.valid"}
    assert momentum.bank.valid.nonzero().flatten().tolist() == index.tolist()


def test_cross_relation_keeps_the_teacher_only_bank():
    loss = build_kd_loss("rpsd", bank=16, k_neg=2)
    assert set(loss.state_dict()) == {"bank.feats", "bank.labels", "bank.valid", "bank.ptr"}


# ---------------------------------------------------------------- errors at start-up

def ctx(dali=False, samples=1000, index=True):
    return SimpleNamespace(cfg={"dali": dali, "dali_aug": False}, train_loader=SimpleNamespace(num_samples=samples),
                           schedule=SimpleNamespace(total_step=100))


def test_bad_settings_are_refused_with_a_clear_error():
    with pytest.raises(ConfigError, match="relation must be one of"):
        build_kd_loss("rpsd", relation="teacher")
    with pytest.raises(ConfigError, match="mining must be one of"):
        build_kd_loss("rpsd", mining="semi-hard")
    with pytest.raises(ConfigError, match="bank_update must be one of"):
        build_kd_loss("rpsd", bank_update="lru")
    for tau in (0.0, -0.1):
        with pytest.raises(ConfigError, match="tau must be > 0"):
            build_kd_loss("rpsd", form="kl", tau=tau)
    with pytest.raises(ConfigError, match="mining='critical'"):
        build_kd_loss("rpsd", far=1e-3)
    with pytest.raises(ConfigError, match="far must be in"):
        build_kd_loss("rpsd", mining="critical", far=0.0)
    with pytest.raises(ConfigError, match="bank_momentum applies"):
        build_kd_loss("rpsd", bank_momentum=0.9)
    with pytest.raises(ConfigError, match="takes no parameter 'tau_s'"):
        build_kd_loss("rpsd", tau_s=0.02)


def test_a_momentum_bank_needs_sample_indices_and_a_slot_per_sample():
    loss = build_kd_loss("rpsd", bank=2000, relation="student", bank_update="momentum")
    loss.bind_training(ctx())
    with pytest.raises(ConfigError, match="DALI"):
        loss.bind_training(ctx(dali=True))
    with pytest.raises(ConfigError, match="at least 5000"):
        loss.bind_training(ctx(samples=5000))
    # a loader that yields no indices anyway: refused on the first batch, forward or bank update
    student, teacher, labels = make_batch()
    with pytest.raises(ConfigError, match="carries no sample indices"):
        loss.after_step(KDBatch(student=student, teacher=teacher, labels=labels))
    fill_bank(loss, 300)
    with pytest.raises(ConfigError, match="carries no sample indices"):
        loss(KDBatch(student=student.requires_grad_(True), teacher=teacher, labels=labels))
    composer = KDComposer({"rpsd": {"weight": 1.0, "bank": 100, "k_neg": 8, "relation": "student",
                                    "bank_update": "momentum"}})
    with pytest.raises(ConfigError, match=r"kd\.losses\.rpsd: .*one slot per training sample"):
        composer.bind_training(ctx(samples=500))


# ---------------------------------------------------------------- 2 processes == 1 process

WORLD = 2
DIST_CASES = {
    "student_batch": {"bank": 0, "k_neg": 3},
    "student_fifo": {"bank": 40, "k_neg": 4, "k_rand": 2},
    "student_momentum_kl": {"bank": 200, "k_neg": 4, "form": "kl", "bank_update": "momentum", "w_pos": 2.0},
    "both_critical": {"bank": 40, "k_neg": 3, "relation": "both", "mining": "critical", "far": 0.05},
    "cross_critical_kl": {"bank": 40, "k_neg": 3, "relation": "cross", "mining": "critical", "far": 0.02,
                          "form": "kl"},
}
DIST_STEPS = 3


def dist_data():
    g = torch.Generator().manual_seed(3)
    steps = []
    for step in range(DIST_STEPS):
        teacher = torch.randn(8, 6, generator=g)
        student = teacher + 0.7 * torch.randn(8, 6, generator=g)
        labels = torch.tensor([0, 1, 2, 3, 0, 1, 4, 5]) + step
        index = torch.randperm(100, generator=g)[:8]
        steps.append((student, teacher, labels, index))
    return steps


def run_dist_case(name, rank, world, part):
    """Three steps of forward, backward, after_step (the bank fills and is used, the threshold moves)."""
    params = dict(DIST_CASES[name])
    params.setdefault("relation", "student")
    loss = build_kd_loss("rpsd", min_bank=1, **params)
    results = []
    for step, (student, teacher, labels, index) in enumerate(dist_data()):
        s = student[part].clone().requires_grad_(True)
        batch = KDBatch(student=s, teacher=teacher[part], labels=labels[part], step=step, rank=rank,
                        world_size=world, index=index[part])
        out = loss(batch)
        out.loss.backward()
        results.append({"loss": out.loss.item(), "grad": s.grad.clone(), "stats": out.stats})
        batch.student = batch.student.detach()
        loss.after_step(batch)
    return results, loss.state_dict()


def dist_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        part = slice(rank * 4, (rank + 1) * 4)
        torch.save({name: run_dist_case(name, rank, WORLD, part) for name in DIST_CASES}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rpsd_dist")
    mp.spawn(dist_worker, args=(str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.dist
@pytest.mark.parametrize("name", list(DIST_CASES))
def test_two_processes_match_one_process(per_rank, name):
    ref, ref_state = run_dist_case(name, 0, 1, slice(None))
    for step in range(DIST_STEPS):
        grad = torch.cat([per_rank[r][name][0][step]["grad"] for r in range(WORLD)]) / WORLD
        torch.testing.assert_close(grad, ref[step]["grad"], rtol=1e-4, atol=1e-6)
        assert ref[step]["grad"].abs().sum() > 0
        mean_loss = sum(per_rank[r][name][0][step]["loss"] for r in range(WORLD)) / WORLD
        assert mean_loss == pytest.approx(ref[step]["loss"], rel=1e-5)
        if "threshold" in ref[step]["stats"]:
            for r in range(WORLD):
                assert per_rank[r][name][0][step]["stats"]["threshold"] == pytest.approx(
                    ref[step]["stats"]["threshold"], rel=1e-6)
    # the bank (student entries included) and the threshold are the same on every rank and as in one process
    assert ref[-1]["stats"]["bank_fill"] > 0 or DIST_CASES[name]["bank"] == 0
    for key, value in ref_state.items():
        for r in range(WORLD):
            torch.testing.assert_close(per_rank[r][name][1][key], value, rtol=1e-6, atol=1e-7, msg=key)
