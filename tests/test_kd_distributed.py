"""The distributed rule, checked for real: 2 gloo processes, each fed its half of a fixed global batch,
give (after DDP's averaging, i.e. dividing by the world size) the student gradient of the whole batch
in one process, and keep identical memory banks."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from plugins.ukd import losses as _losses  # noqa: F401  (registers the losses)
from plugins.ukd import build_kd_loss
from plugins.ukd.batch import KDBatch

WORLD = 2
GLOBAL_B, DIM = 8, 6
# Labels shared across the two halves, so positives cross ranks.
LABELS = torch.tensor([0, 1, 2, 3, 0, 1, 4, 5])
CASES = {
    "iled_topk": ("iled", {"ratio": 0.375, "beta": 2.0}),  # 3 hard: never split evenly
    "iled_std": ("iled", {"mode": "std", "kappa": 0.5, "distance": "l2sq"}),
    "rpsd_mse": ("rpsd", {"bank": 40, "k_neg": 4, "k_rand": 2}),
    "rpsd_kl": ("rpsd", {"bank": 40, "k_neg": 4, "form": "kl", "fp16": True}),
    "fc": ("fc", {}),
    "l2": ("l2", {}),
    "rkd": ("rkd", {}),
    "sp": ("sp", {}),
}
WARMUP_STEPS = 3   # after_step calls before the measured step: 24 of 40 bank slots filled


def make_data():
    g = torch.Generator().manual_seed(0)
    past = [(torch.randn(GLOBAL_B, DIM, generator=g), torch.randint(0, 6, (GLOBAL_B,), generator=g))
            for _ in range(WARMUP_STEPS)]
    teacher = torch.randn(GLOBAL_B, DIM, generator=g)
    student = teacher + 0.7 * torch.randn(GLOBAL_B, DIM, generator=g)
    return student, teacher, past


def run_case(name, student, teacher, labels, past, rank, world, part):
    """Warm the loss up with after_step on past batches, then one forward/backward; part slices a batch."""
    loss_name, params = CASES[name]
    loss = build_kd_loss(loss_name, **params)
    for step, (t_past, y_past) in enumerate(past):
        loss.after_step(KDBatch(student=t_past[part], teacher=t_past[part], labels=y_past[part], step=step,
                                rank=rank, world_size=world))
    s = student[part].clone().requires_grad_(True)
    out = loss(KDBatch(student=s, teacher=teacher[part], labels=labels[part], step=len(past), rank=rank,
                       world_size=world))
    out.loss.backward()
    return {"loss": out.loss.item(), "grad": s.grad.clone(), "state": loss.state_dict()}


def worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        student, teacher, past = make_data()
        local = GLOBAL_B // WORLD
        part = slice(rank * local, (rank + 1) * local)
        results = {name: run_case(name, student, teacher, LABELS, past, rank, WORLD, part) for name in CASES}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kd_dist")
    mp.spawn(worker, args=(str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.dist
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_one_process(per_rank, name):
    student, teacher, past = make_data()
    ref = run_case(name, student, teacher, LABELS, past, rank=0, world=1, part=slice(None))
    # DDP averages the per-rank gradients: each rank's share of the global gradient is its grad / WORLD.
    grad = torch.cat([per_rank[r][name]["grad"] for r in range(WORLD)]) / WORLD
    torch.testing.assert_close(grad, ref["grad"], rtol=1e-4, atol=1e-6)
    # The mean of the per-rank values is the loss of the global batch.
    mean_loss = sum(per_rank[r][name]["loss"] for r in range(WORLD)) / WORLD
    assert mean_loss == pytest.approx(ref["loss"], rel=1e-5)
    assert ref["grad"].abs().sum() > 0


@pytest.mark.dist
@pytest.mark.parametrize("name", ["rpsd_mse", "rpsd_kl"])
def test_memory_banks_are_identical_on_every_rank(per_rank, name):
    student, teacher, past = make_data()
    ref = run_case(name, student, teacher, LABELS, past, rank=0, world=1, part=slice(None))
    states = [per_rank[r][name]["state"] for r in range(WORLD)]
    assert int(states[0]["bank.valid"].sum()) == WARMUP_STEPS * GLOBAL_B
    for key, value in ref["state"].items():
        assert torch.equal(states[0][key], states[1][key]), key
        assert torch.equal(states[0][key], value), key
