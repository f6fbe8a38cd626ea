import math

import pytest
import torch

from arcface.engine.scheduler import PolynomialLRWarmup


def expected(base, t, warmup, total, power):
    """Straightforward reading of the schedule: linear warmup, then (1 - progress)^power."""
    t = min(t, total)
    if warmup > 0 and t <= warmup:
        return base * t / warmup
    return base * (1 - (t - warmup) / (total - warmup)) ** power


@pytest.mark.parametrize("warmup,total,power", [(0, 50, 1.0), (10, 50, 1.0), (5, 20, 2.0)])
def test_values_follow_closed_form(warmup, total, power):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [param]}, {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=0.1)
    sched = PolynomialLRWarmup(opt, warmup, total, power)
    seen = []
    for t in range(total + 5):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for t, lrs in enumerate(seen):
        for lr in lrs:  # both groups (backbone and Partial FC) follow the same schedule
            assert math.isclose(lr, expected(0.1, t, warmup, total, power), abs_tol=1e-12)
    assert seen[-1][0] == 0.0


def test_state_dict_round_trip_resumes_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = PolynomialLRWarmup(opt, 3, 30)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    sched2 = PolynomialLRWarmup(opt2, 3, 30)
    sched2.load_state_dict(state)
    opt.step(); sched.step(); opt2.step(); sched2.step()
    assert math.isclose(opt.param_groups[0]["lr"], opt2.param_groups[0]["lr"])
    assert math.isclose(opt2.param_groups[0]["lr"], expected(0.2, 8, 3, 30, 1.0))
