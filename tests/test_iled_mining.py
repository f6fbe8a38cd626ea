"""ILED's dynamic hard mining: a threshold that follows training (EMA), a hard ratio annealed over the run's
schedule, and hardness from the margin head (low target cosine, read from the class centres, summed over the
shards). Golden values and gradients from plain loops, state in the checkpoint, 2 processes == 1 process,
start-up errors."""
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
N_CLASSES = 6


def make_batch(b=8, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, d, generator=g).to(DT)
    student = teacher + 0.8 * torch.randn(b, d, generator=g, dtype=DT)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 2][:b])
    return student, teacher, labels


def make_head(d=5, seed=9, start=0, stop=N_CLASSES):
    """A stand-in for this rank's PartialFC_V2 shard: weight rows for classes [start, stop)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(N_CLASSES, d, generator=g, dtype=DT)
    return SimpleNamespace(weight=weight[start:stop], class_start=start, num_local=stop - start)


def run_loss(loss, student, teacher, labels, step=0):
    s = student.clone().requires_grad_(True)
    out = loss(KDBatch(student=s, teacher=teacher, labels=labels, step=step))
    out.loss.backward()
    return out, s.grad


def train_ctx(total_step=100, projector="auto"):
    return SimpleNamespace(cfg={"kd": {"projector": projector}}, schedule=SimpleNamespace(total_step=total_step),
                           train_loader=None)


# ---------------------------------------------------------------- plain loops

def dot(u, v):
    return sum(u[k] * v[k] for k in range(len(u)))


def cosine(u, v):
    return dot(u, v) / torch.sqrt(dot(u, u) * dot(v, v))


def loop_target_cosines(student, labels, weight):
    return [float(cosine(student[i].detach(), weight[int(labels[i])])) for i in range(len(student))]


def loop_iled(student, teacher, ratio, beta, mode, scores=None, threshold=None, kappa=1.0):
    n = len(student)
    d = [1 - cosine(student[i], teacher[i]) for i in range(n)]
    values = scores if scores is not None else [float(x.detach()) for x in d]
    if mode == "topk":
        order = sorted(range(n), key=lambda i: -values[i])
        hard = set(order[:math.ceil(round(ratio * n, 9))])
    elif mode == "std":
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
        hard = {i for i in range(n) if values[i] > mean + kappa * std}
    else:
        hard = {i for i in range(n) if values[i] >= threshold}
    w = [1 + beta * (i in hard) for i in range(n)]
    return sum(w[i] * d[i] for i in range(n)) / sum(w), hard


def kth(values, k):
    return sorted(values, reverse=True)[k - 1]


# ---------------------------------------------------------------- EMA threshold

def test_ema_threshold_golden_over_steps_and_saved_in_the_state():
    loss = build_kd_loss("iled", ratio=0.25, beta=2.0, mode="ema", momentum=0.8)
    threshold = None
    for step in range(3):
        student, teacher, labels = make_batch(seed=step)
        out, grad = run_loss(loss, student, teacher, labels, step=step)
        d = [float(1 - cosine(student[i], teacher[i])) for i in range(8)]
        value = kth(d, 2)
        threshold = value if threshold is None else 0.8 * threshold + 0.2 * value
        s = student.clone().requires_grad_(True)
        ref, hard = loop_iled(s, teacher, 0.25, 2.0, "ema", threshold=threshold)
        ref.backward()
        assert out.stats["threshold"] == pytest.approx(threshold, rel=1e-12)
        assert out.loss.item() == pytest.approx(ref.item(), rel=1e-10)
        torch.testing.assert_close(grad, s.grad, rtol=1e-9, atol=1e-12)
        assert out.stats["hard_frac"] == len(hard) / 8
    fresh = build_kd_loss("iled", ratio=0.25, beta=2.0, mode="ema", momentum=0.8)
    fresh.load_state_dict(loss.state_dict())
    assert set(loss.state_dict()) == {"threshold", "threshold_steps"}
    student, teacher, labels = make_batch(seed=7)
    assert run_loss(fresh, student, teacher, labels)[0].loss.item() == \
        run_loss(loss, student, teacher, labels)[0].loss.item()


def test_ema_with_momentum_zero_is_topk():
    student, teacher, labels = make_batch(seed=3)
    ema, g_ema = run_loss(build_kd_loss("iled", ratio=0.375, mode="ema", momentum=0.0), student, teacher, labels)
    topk, g_topk = run_loss(build_kd_loss("iled", ratio=0.375), student, teacher, labels)
    assert ema.loss.item() == pytest.approx(topk.loss.item(), rel=1e-12)
    torch.testing.assert_close(g_ema, g_topk)


def test_ema_hard_fraction_varies_with_the_batch():
    """Unlike topk, a batch whose distances all lie above the running threshold is hard everywhere."""
    loss = build_kd_loss("iled", ratio=0.25, mode="ema", momentum=0.9)
    student, teacher, labels = make_batch()
    run_loss(loss, student, teacher, labels)
    far = teacher + 5.0 * (student - teacher)
    out, _ = run_loss(loss, far, teacher, labels, step=1)
    assert out.stats["hard_frac"] > 0.25


# ---------------------------------------------------------------- annealed ratio

@pytest.mark.parametrize("step,ratio", [(0, 0.5), (50, 0.3), (100, 0.1), (250, 0.1)])
def test_ratio_anneals_linearly_over_the_schedule(step, ratio):
    loss = build_kd_loss("iled", ratio=0.5, ratio_end=0.1, beta=1.5)
    loss.bind_training(train_ctx(total_step=100))
    student, teacher, labels = make_batch(b=8)
    out, grad = run_loss(loss, student, teacher, labels, step=step)
    assert out.stats["ratio"] == pytest.approx(ratio)
    s = student.clone().requires_grad_(True)
    ref, hard = loop_iled(s, teacher, ratio, 1.5, "topk")
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(grad, s.grad, rtol=1e-9, atol=1e-12)
    assert out.stats["hard_frac"] == len(hard) / 8


def test_annealing_needs_the_schedule():
    loss = build_kd_loss("iled", ratio_end=0.1)
    student, teacher, labels = make_batch()
    with pytest.raises(ConfigError, match="total step count"):
        run_loss(loss, student, teacher, labels)
    with pytest.raises(ConfigError, match="schedule"):
        loss.bind_training(SimpleNamespace(cfg={}, schedule=None, train_loader=None))
    composer = KDComposer({"iled": {"weight": 1.0, "ratio_end": 0.1}})
    with pytest.raises(ConfigError, match=r"kd\.losses\.iled: .*schedule"):
        composer.bind_training(SimpleNamespace(cfg={}, schedule=None, train_loader=None))


# ---------------------------------------------------------------- hardness from the margin head

@pytest.mark.parametrize("mode", ["topk", "std", "ema"])
def test_margin_hardness_golden_value_and_gradient(mode):
    student, teacher, labels = make_batch(seed=1)
    head = make_head()
    extra = {"momentum": 0.5} if mode == "ema" else {}
    loss = build_kd_loss("iled", ratio=0.25, beta=3.0, mode=mode, kappa=0.5, hardness="margin", **extra)
    assert loss.uses_head
    loss.configure_head(head)
    out, grad = run_loss(loss, student, teacher, labels)
    cos = loop_target_cosines(student, labels, head.weight)
    scores = [1 - c for c in cos]
    s = student.clone().requires_grad_(True)
    ref, hard = loop_iled(s, teacher, 0.25, 3.0, mode, scores=scores, threshold=kth(scores, 2), kappa=0.5)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(grad, s.grad, rtol=1e-9, atol=1e-12)
    assert out.stats["target_cos"] == pytest.approx(sum(cos) / 8)
    assert out.stats["hard_frac"] == len(hard) / 8


def test_margin_hardness_picks_other_samples_than_the_distance():
    student, teacher, labels = make_batch(seed=1)
    margin = build_kd_loss("iled", ratio=0.25, beta=3.0, hardness="margin")
    margin.configure_head(make_head())
    distance = build_kd_loss("iled", ratio=0.25, beta=3.0)
    assert run_loss(margin, student, teacher, labels)[0].loss.item() != \
        pytest.approx(run_loss(distance, student, teacher, labels)[0].loss.item())


def test_margin_hardness_errors():
    student, teacher, labels = make_batch()
    loss = build_kd_loss("iled", hardness="margin")
    with pytest.raises(ConfigError, match="configure_head was never called"):
        run_loss(loss, student, teacher, labels)
    loss.configure_head(make_head(d=7))
    with pytest.raises(ConfigError, match="own embedding"):
        run_loss(loss, student, teacher, labels)
    with pytest.raises(ConfigError, match="projector='linear'"):
        loss.bind_training(train_ctx(projector="linear"))
    loss.bind_training(train_ctx())
    composer = KDComposer({"iled": {"weight": 1.0, "hardness": "margin"}, "fc": {"weight": 1.0}})
    assert [type(t).name for t in composer.head_terms()] == ["iled"]
    assert KDComposer({"iled": {"weight": 1.0}}).head_terms() == []


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="hardness must be one of"):
        build_kd_loss("iled", hardness="loss")
    with pytest.raises(ConfigError, match="mode must be one of"):
        build_kd_loss("iled", mode="anneal")
    with pytest.raises(ConfigError, match="ratio_end must be in"):
        build_kd_loss("iled", ratio_end=1.5)
    with pytest.raises(ConfigError, match="mode 'std' has no ratio"):
        build_kd_loss("iled", mode="std", ratio_end=0.1)
    with pytest.raises(ConfigError, match="momentum is the EMA"):
        build_kd_loss("iled", momentum=0.9)
    with pytest.raises(ConfigError, match="momentum must be in"):
        build_kd_loss("iled", mode="ema", momentum=1.0)


# ---------------------------------------------------------------- 2 processes == 1 process

WORLD = 2
DIST_CASES = {
    "margin_topk": {"ratio": 0.375, "beta": 2.0, "hardness": "margin"},
    "margin_ema": {"ratio": 0.25, "beta": 2.0, "hardness": "margin", "mode": "ema", "momentum": 0.6},
    "ema_annealed": {"ratio": 0.5, "ratio_end": 0.125, "beta": 1.0, "mode": "ema", "momentum": 0.3},
}
DIST_STEPS = 3


def run_dist_case(name, rank, world, part, head):
    loss = build_kd_loss("iled", **DIST_CASES[name])
    loss.bind_training(train_ctx(total_step=DIST_STEPS - 1))
    loss.configure_head(head)
    results = []
    for step in range(DIST_STEPS):
        student, teacher, labels = make_batch(seed=10 + step)
        s = student[part].clone().requires_grad_(True)
        out = loss(KDBatch(student=s, teacher=teacher[part], labels=labels[part], step=step, rank=rank,
                           world_size=world))
        out.loss.backward()
        results.append({"loss": out.loss.item(), "grad": s.grad.clone(), "stats": out.stats})
    return results, loss.state_dict()


def dist_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        half = N_CLASSES // WORLD
        head = make_head(start=rank * half, stop=(rank + 1) * half)   # each rank holds half the class centres
        part = slice(rank * 4, (rank + 1) * 4)
        torch.save({name: run_dist_case(name, rank, WORLD, part, head) for name in DIST_CASES},
                   f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iled_dist")
    mp.spawn(dist_worker, args=(str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.dist
@pytest.mark.parametrize("name", list(DIST_CASES))
def test_two_processes_match_one_process(per_rank, name):
    ref, ref_state = run_dist_case(name, 0, 1, slice(None), make_head())
    for step in range(DIST_STEPS):
        grad = torch.cat([per_rank[r][name][0][step]["grad"] for r in range(WORLD)]) / WORLD
        torch.testing.assert_close(grad, ref[step]["grad"], rtol=1e-6, atol=1e-9)
        mean_loss = sum(per_rank[r][name][0][step]["loss"] for r in range(WORLD)) / WORLD
        assert mean_loss == pytest.approx(ref[step]["loss"], rel=1e-9)
        for r in range(WORLD):
            assert per_rank[r][name][0][step]["stats"] == pytest.approx(ref[step]["stats"], rel=1e-9)
    for key, value in ref_state.items():
        for r in range(WORLD):
            torch.testing.assert_close(per_rank[r][name][1][key], value, msg=key)
