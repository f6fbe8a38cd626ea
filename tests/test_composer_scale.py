"""Scale-free KD weights (a term's 'scale' key): the term divided by a running estimate of its own value ('loss')
or of its per-sample gradient norm at the student embedding ('grad'), bias-corrected EMAs kept in the composer's
state. Golden values against hand-computed EMAs, 2 processes == 1 process, errors."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from arcface.errors import ConfigError
from plugins.ukd import build_kd_loss
from plugins.ukd.batch import KDBatch
from plugins.ukd.composer import SCALE_MOMENTUM, KDComposer

DT = torch.float64


def make_batch(seed, b=8, d=6):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, d, generator=g)
    student = (teacher + 0.6 * torch.randn(b, d, generator=g)).to(DT)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 4, 5])
    return student, teacher.to(DT), labels


def ema_values(values, m=SCALE_MOMENTUM):
    """The bias-corrected EMA after each value."""
    out, mean = [], 0.0
    for n, v in enumerate(values, start=1):
        mean = m * mean + (1 - m) * v
        out.append(mean / (1 - m ** n))
    return out


def plain(name, student, teacher, labels, **params):
    """(loss value, gradient at the student) of a fresh loss, the reference for one term."""
    s = student.clone().requires_grad_(True)
    loss = build_kd_loss(name, **params)(KDBatch(student=s, teacher=teacher, labels=labels)).loss
    grad, = torch.autograd.grad(loss, s)
    return loss.item(), grad


@pytest.mark.parametrize("scale", ["loss", "grad"])
def test_scaled_term_is_the_term_over_its_running_scale(scale):
    composer = KDComposer({"fc": {"weight": 3.0, "scale": scale}, "iled": {"weight": 2.0}})
    observed = []
    for step in range(4):
        student, teacher, labels = make_batch(step)
        value, grad = plain("fc", student, teacher, labels)
        observed.append(value if scale == "loss" else math.sqrt(8) * grad.norm().item())
        s = student.clone().requires_grad_(True)
        losses, stats = composer(KDBatch(student=s, teacher=teacher, labels=labels, step=step))
        expected_scale = ema_values(observed)[-1]
        assert stats["fc/scale"] == pytest.approx(expected_scale, rel=1e-9)
        assert losses["fc"].item() == pytest.approx(3.0 * value / expected_scale, rel=1e-9)
        assert stats["fc"] == pytest.approx(value)            # the logged term stays the loss itself
        got, = torch.autograd.grad(losses["fc"], s)
        torch.testing.assert_close(got, 3.0 * grad / expected_scale)   # the scale carries no gradient
        assert "iled/scale" not in stats
    assert int(composer.scalers["fc"].steps) == 4
    divisor = "/ ema(fc)" if scale == "loss" else "/ ema(|grad fc|)"
    assert f"3.0 * fc() {divisor} + 2.0 * iled(" in composer.formula()


def test_at_the_first_step_a_loss_scaled_term_equals_its_weight():
    student, teacher, labels = make_batch(0)
    composer = KDComposer({"rpsd": {"weight": 5.0, "scale": "loss", "bank": 0, "relation": "student",
                                    "require_positives": False}})
    losses, _ = composer(KDBatch(student=student.requires_grad_(True), teacher=teacher, labels=labels))
    assert losses["rpsd"].item() == pytest.approx(5.0)


def test_scales_are_saved_and_restored_and_absent_when_unused():
    spec = {"fc": {"weight": 1.0, "scale": "grad"}, "iled": {"weight": 1.0, "scale": "loss"}, "l2": {"weight": 1.0}}
    composer = KDComposer(spec)
    for step in range(3):
        student, teacher, labels = make_batch(step)
        composer(KDBatch(student=student.requires_grad_(True), teacher=teacher, labels=labels, step=step))
    state = composer.state_dict()
    assert {k for k in state if k.startswith("scalers.")} == {"scalers.fc.mean", "scalers.fc.steps",
                                                               "scalers.iled.mean", "scalers.iled.steps"}
    fresh = KDComposer(spec)
    fresh.load_state_dict(state)
    student, teacher, labels = make_batch(9)
    a = composer(KDBatch(student=student.clone().requires_grad_(True), teacher=teacher, labels=labels, step=3))
    b = fresh(KDBatch(student=student.clone().requires_grad_(True), teacher=teacher, labels=labels, step=3))
    assert a[1] == b[1]
    assert not any(k.startswith("scalers.") for k in KDComposer({"fc": {"weight": 1.0}}).state_dict())


def test_a_bad_scale_is_refused():
    with pytest.raises(ConfigError, match=r"kd\.losses\.fc\.scale must be one of"):
        KDComposer({"fc": {"weight": 1.0, "scale": "auto"}})


# ---------------------------------------------------------------- 2 processes == 1 process

WORLD = 2
SPEC = {"rpsd": {"weight": 2.0, "scale": "grad", "bank": 40, "k_neg": 3, "relation": "student", "min_bank": 1},
        "iled": {"weight": 1.0, "scale": "grad"},
        "fc": {"weight": 3.0, "scale": "loss"}}


def run_case(rank, world, part, steps=3):
    composer = KDComposer(SPEC)
    out = []
    for step in range(steps):
        student, teacher, labels = make_batch(20 + step)
        s = student[part].clone().requires_grad_(True)
        batch = KDBatch(student=s, teacher=teacher[part], labels=labels[part], step=step, rank=rank,
                        world_size=world)
        losses, stats = composer(batch)
        sum(losses.values()).backward()
        out.append({"grad": s.grad.clone(), "stats": stats, "total": sum(v.item() for v in losses.values())})
        batch.student = batch.student.detach()
        composer.after_step(batch)
    return out


def worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.save(run_case(rank, WORLD, slice(rank * 4, (rank + 1) * 4)), f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_processes_match_one_process(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ref = run_case(0, 1, slice(None))
    for step in range(3):
        grad = torch.cat([per_rank[r][step]["grad"] for r in range(WORLD)]) / WORLD
        torch.testing.assert_close(grad, ref[step]["grad"], rtol=1e-6, atol=1e-9)
        for key in ("rpsd/scale", "iled/scale", "fc/scale"):
            for r in range(WORLD):
                assert per_rank[r][step]["stats"][key] == pytest.approx(ref[step]["stats"][key], rel=1e-7), key
        total = sum(per_rank[r][step]["total"] for r in range(WORLD)) / WORLD
        assert total == pytest.approx(ref[step]["total"], rel=1e-7)
