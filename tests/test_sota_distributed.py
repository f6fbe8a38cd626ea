"""2 gloo processes, each fed its half of a fixed global batch, against 1 process on the whole batch, for the
face-recognition KD methods: ekd and mrd (loss, student gradient, ekd's thresholds over two steps), adadistill
(the centres each rank updates in its shard, then Partial FC's loss and gradient against them) and proxyless
(each rank's shard read from teacher heads saved by 1 and 3 processes)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from arcface.losses import CombinedMarginLoss
from arcface.partial_fc import PartialFC_V2, shard_range
from plugins.ukd import build_kd_loss
from plugins.ukd.batch import KDBatch

WORLD = 2
GLOBAL_B, DIM, CLASSES = 12, 6, 7
# classes repeat within and across the two halves (class 3 four times), as in P x K batches
LABELS = torch.tensor([3, 0, 3, 5, 6, 3, 0, 2, 5, 6, 1, 3])
CASES = {
    "ekd_critical": ("ekd", {"fprs": [0.2, 0.05, 0.01], "tau": 0.05, "momentum": 0.3, "k_neg": 8}),
    "ekd_hard": ("ekd", {"fprs": [0.1, 0.02], "tau": 0.1, "selection": "hard", "k_neg": 6, "w_pos": 1.0,
                         "w_neg": 1.0}),
    "mrd_mse": ("mrd", {"k_neg": 3}),
    "mrd_kl": ("mrd", {"k_neg": 4, "form": "kl", "tau": 0.2}),
}
STEPS = 2


def make_data(step):
    g = torch.Generator().manual_seed(100 + step)
    teacher = torch.randn(GLOBAL_B, DIM, generator=g)
    student = teacher + 0.9 * torch.randn(GLOBAL_B, DIM, generator=g)
    return student, teacher


def centre_table():
    return torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(7))


def run_case(name, rank, world, part):
    """STEPS forward/backward passes of one loss; per step its value and the student gradient."""
    loss_name, params = CASES[name]
    loss = build_kd_loss(loss_name, **params)
    out = []
    for step in range(STEPS):
        student, teacher = make_data(step)
        s = student[part].clone().requires_grad_(True)
        result = loss(KDBatch(student=s, teacher=teacher[part], labels=LABELS[part], step=step, rank=rank,
                              world_size=world))
        result.loss.backward()
        out.append({"loss": result.loss.item(), "grad": s.grad.clone()})
    return {"steps": out, "state": {k: v.clone() for k, v in loss.state_dict().items()}}


def run_adadistill(rank, world, part):
    """Centres follow the teacher in before_head, then Partial FC (CosFace) trains the student against them."""
    pfc = PartialFC_V2(CombinedMarginLoss(16.0, 1.0, 0.0, 0.35), DIM, CLASSES, 1.0)
    start, rows = shard_range(CLASSES, rank, world)
    assert (pfc.class_start, pfc.num_local) == (start, rows)
    pfc.weight.data.copy_(centre_table()[start:start + rows])
    loss = build_kd_loss("adadistill")
    loss.configure_head(pfc)
    out = []
    for step in range(STEPS):
        student, teacher = make_data(step)
        s = student[part].clone().requires_grad_(True)
        batch = KDBatch(student=s, teacher=teacher[part], labels=LABELS[part], step=step, rank=rank, world_size=world)
        loss.before_head(pfc, batch)
        ce = pfc(s, LABELS[part])
        ce.backward()
        out.append({"loss": ce.item(), "grad": s.grad.clone(), "centres": pfc.weight.detach().clone()})
    return out


def run_proxyless(folders):
    """This process's head loaded from each teacher folder: {folder: shard}."""
    pfc = PartialFC_V2(CombinedMarginLoss(16.0, 1.0, 0.0, 0.35), DIM, CLASSES, 1.0)
    shards = {}
    for folder in folders:
        build_kd_loss("proxyless", teacher_head=folder).configure_head(pfc)
        shards[folder] = pfc.weight.detach().clone()
    return shards


def save_teacher_heads(root):
    """The same teacher head saved by a 1-process and by a 3-process run (upstream's file layout)."""
    folders = []
    for world in (1, 3):
        folder = os.path.join(root, f"teacher_{world}")
        os.makedirs(folder, exist_ok=True)
        for rank in range(world):
            start, rows = shard_range(CLASSES, rank, world)
            torch.save({"state_dict_softmax_fc": {"weight": centre_table()[start:start + rows]}},
                       os.path.join(folder, f"checkpoint_gpu_{rank}.pt"))
        folders.append(folder)
    return folders


def worker(rank, init_file, out_dir, folders):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        local = GLOBAL_B // WORLD
        part = slice(rank * local, (rank + 1) * local)
        results = {name: run_case(name, rank, WORLD, part) for name in CASES}
        results["adadistill"] = run_adadistill(rank, WORLD, part)
        results["proxyless"] = run_proxyless(folders)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sota_dist")
    folders = save_teacher_heads(str(tmp))
    mp.spawn(worker, args=(str(tmp / "rendezvous"), str(tmp), folders), nprocs=WORLD, join=True)
    return {"ranks": [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)], "folders": folders}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.dist
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_one_process(world, name):
    per_rank = world["ranks"]
    ref = run_case(name, rank=0, world=1, part=slice(None))
    for step in range(STEPS):
        # DDP averages the per-rank gradients: each rank's share of the global gradient is its grad / WORLD
        grad = torch.cat([per_rank[r][name]["steps"][step]["grad"] for r in range(WORLD)]) / WORLD
        torch.testing.assert_close(grad, ref["steps"][step]["grad"], rtol=1e-4, atol=1e-6)
        mean_loss = sum(per_rank[r][name]["steps"][step]["loss"] for r in range(WORLD)) / WORLD
        assert mean_loss == pytest.approx(ref["steps"][step]["loss"], rel=1e-5)
        assert ref["steps"][step]["grad"].abs().sum() > 0
    for key, value in ref["state"].items():   # ekd's thresholds: the same on every rank and in one process
        assert torch.equal(per_rank[0][name]["state"][key], per_rank[1][name]["state"][key]), key
        torch.testing.assert_close(per_rank[0][name]["state"][key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.dist
def test_adadistill_two_processes_update_the_centres_of_one_process(world):
    per_rank = world["ranks"]
    ref = run_adadistill(0, 1, slice(None))
    for step in range(STEPS):
        centres = torch.cat([per_rank[r]["adadistill"][step]["centres"] for r in range(WORLD)])
        torch.testing.assert_close(centres, ref[step]["centres"], rtol=0, atol=1e-6)
        grad = torch.cat([per_rank[r]["adadistill"][step]["grad"] for r in range(WORLD)]) / WORLD
        torch.testing.assert_close(grad, ref[step]["grad"], rtol=1e-4, atol=1e-6)
        for r in range(WORLD):   # Partial FC's loss is the global-batch mean on every rank
            assert per_rank[r]["adadistill"][step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5)
    assert not torch.equal(ref[0]["centres"], centre_table())


@pytest.mark.dist
def test_proxyless_each_rank_holds_its_shard_of_any_teacher_world_size(world):
    table = centre_table()
    for folder in world["folders"]:
        shards = [world["ranks"][r]["proxyless"][folder] for r in range(WORLD)]
        assert [s.shape[0] for s in shards] == [shard_range(CLASSES, r, WORLD)[1] for r in range(WORLD)]
        assert torch.equal(torch.cat(shards), table)
