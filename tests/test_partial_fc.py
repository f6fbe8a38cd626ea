"""Partial FC against a plain full-softmax margin cross-entropy computed independently, 1 and 2 processes."""
import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from arcface.errors import DataError
from arcface.losses import CombinedMarginLoss
from arcface.partial_fc import PartialFC_V2, sample_scores, sampled_centres, shard_range


def plain_margin_ce(emb, weight, labels, s, m1, m2, m3):
    """Textbook margin softmax with arcface_torch's gradient rule: the target cosine takes the value
    cos(m1*theta + m2) - m3 but keeps slope 1 (straight-through), then scale s and cross-entropy."""
    cos = F.normalize(emb) @ F.normalize(weight).t()
    rows = []
    for i in range(cos.shape[0]):
        y = int(labels[i])
        target = cos[i, y]
        with torch.no_grad():
            shift = torch.cos(m1 * torch.acos(target) + m2) - m3 - target
        row = torch.cat([cos[i, :y], (target + shift).view(1), cos[i, y + 1:]])
        rows.append(row * s)
    return F.cross_entropy(torch.stack(rows), labels)


def rel_close(a, b, rtol):
    """|a - b| small next to the size of b: float32 sums lose precision relative to their largest terms."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max()) <= rtol * max(float(b.abs().max()), 1e-30)


@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.0, 0.3, 0.2), (0.9, 0.4, 0.15)])
def test_full_rate_equals_plain_margin_softmax(margins):
    torch.manual_seed(0)
    b, d, c = 12, 16, 30
    emb = torch.randn(b, d, requires_grad=True)
    labels = torch.randint(0, c, (b,))
    pfc = PartialFC_V2(CombinedMarginLoss(64, *margins), d, c, sample_rate=1.0)
    loss = pfc(emb, labels)
    loss.backward()

    emb2 = emb.detach().clone().requires_grad_(True)
    w2 = pfc.weight.detach().clone().requires_grad_(True)
    ref = plain_margin_ce(emb2, w2, labels, 64.0, *margins)
    ref.backward()
    assert rel_close(loss.detach(), ref.detach(), 1e-6)
    assert rel_close(emb.grad, emb2.grad, 1e-5)
    assert rel_close(pfc.weight.grad, w2.grad, 1e-5)


# ---------------------------------------------------------------- negative sampling
def sampled_global_classes(labels, num_classes, world, sample_rate, seed, step):
    """The classes every shard scores for one step, as global ids: what each rank computes on its own."""
    chosen = []
    for rank in range(world):
        start, n = shard_range(num_classes, rank, world)
        local = labels - start
        local[(local < 0) | (local >= n)] = -1
        chosen += (sampled_centres(local, start, n, int(sample_rate * n), seed, step) + start).tolist()
    return chosen


def test_sampling_keeps_all_positives_and_remaps_labels():
    pfc = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 100, sample_rate=0.1)
    labels = torch.tensor([5, 17, 17, 93, 40, 5])
    remapped = labels.clone()
    index = pfc.sample(remapped, step=3)
    assert index.numel() == 10 and index.unique().numel() == 10
    assert {5, 17, 93, 40} <= set(index.tolist())
    assert torch.equal(index, index.sort().values)
    assert torch.equal(index[remapped], labels)


def test_more_positives_than_samples_uses_positives_only():
    pfc = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 20, sample_rate=0.1)
    labels = torch.tensor([1, 2, 3, 4, 5])
    index = pfc.sample(labels.clone(), step=0)
    assert index.tolist() == [1, 2, 3, 4, 5]


def test_sample_scores_are_a_bijection_per_step():
    ids = torch.arange(200_000)
    for seed, step in [(0, 0), (2048, 1), (2048, 123456)]:
        scores = sample_scores(seed, step, ids)
        assert scores.dtype == torch.int64 and int(scores.min()) >= 0 and int(scores.max()) < 2 ** 32
        assert scores.unique().numel() == ids.numel()
    assert not torch.equal(sample_scores(0, 1, ids), sample_scores(0, 2, ids))
    assert not torch.equal(sample_scores(1, 1, ids), sample_scores(2, 1, ids))
    assert torch.equal(sample_scores(7, 9, ids.flip(0)), sample_scores(7, 9, ids).flip(0))


def test_negatives_are_drawn_uniformly_over_steps():
    """Each of the 95 negative classes has a 6/95 chance per step: counts over 3000 steps stay within
    5 binomial standard deviations of 3000 * 6 / 95, and two steps rarely choose the same set."""
    labels = torch.tensor([0, 1, 2, 3, 4])
    steps = 3000
    counts = torch.zeros(100)
    sets = set()
    for step in range(steps):
        index = sampled_centres(labels, 0, 100, 11, seed=2048, step=step)
        assert index[:5].tolist() == [0, 1, 2, 3, 4]
        counts[index] += 1
        sets.add(tuple(index.tolist()))
    p = 6 / 95
    mean, std = steps * p, math.sqrt(steps * p * (1 - p))
    assert torch.all(counts[:5] == steps)
    assert float((counts[5:] - mean).abs().max()) < 5 * std
    assert len(sets) > steps * 0.99


def test_sampling_ignores_the_global_rng_and_is_reproduced_from_the_step():
    torch.manual_seed(0)
    c, d = 400, 8
    weight = torch.randn(c, d)
    batches = [(torch.randn(6, d), torch.randint(0, c, (6,))) for _ in range(4)]

    def run(batches, steps, disturb=False):
        pfc = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), d, c, sample_rate=0.05, sample_seed=11)
        with torch.no_grad():
            pfc.weight.copy_(weight)
        out = []
        for (x, y), step in zip(batches, steps):
            if disturb:  # another component drawing from the global generator
                torch.manual_seed(len(out) + 99)
                torch.rand(1000)
            pfc.weight.grad = None
            loss = pfc(x, y) if step is None else pfc(x, y, step=step)
            loss.backward()
            out.append((float(loss.detach()), pfc.weight.grad.abs().sum(1).nonzero().view(-1).tolist()))
        return out

    counted = run(batches, [None] * 4)  # the module counts its own forwards: steps 0, 1, 2, 3
    assert all(len(classes) == 20 for _, classes in counted)
    assert run(batches, [None] * 4, disturb=True) == counted
    assert run(batches, [0, 1, 2, 3], disturb=True) == counted
    # a resumed run that is told it is at step 2 scores what the uninterrupted run scored at step 2
    assert run(batches[2:], [2, 3]) == counted[2:]
    assert run(batches[2:], [None, None]) != counted[2:]


def test_sampled_loss_equals_plain_softmax_over_the_sampled_classes():
    torch.manual_seed(0)
    c, d, b, step, seed = 1000, 8, 16, 5, 3
    pfc = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), d, c, sample_rate=0.05, sample_seed=seed)
    emb = torch.randn(b, d, requires_grad=True)
    labels = torch.randint(0, c, (b,))
    loss = pfc(emb, labels, step=step)
    loss.backward()

    classes = sampled_global_classes(labels, c, 1, 0.05, seed, step)
    assert len(classes) == 50 and set(labels.tolist()) <= set(classes)
    emb2 = emb.detach().clone().requires_grad_(True)
    w2 = pfc.weight.detach()[classes].clone().requires_grad_(True)
    position = {k: i for i, k in enumerate(classes)}
    ref = plain_margin_ce(emb2, w2, torch.tensor([position[int(y)] for y in labels]), 64.0, 1.0, 0.5, 0.0)
    ref.backward()
    assert rel_close(loss.detach(), ref.detach(), 1e-6)
    assert rel_close(emb.grad, emb2.grad, 1e-5)
    assert rel_close(pfc.weight.grad[classes], w2.grad, 1e-5)
    others = torch.ones(c, dtype=torch.bool)
    others[classes] = False
    assert torch.all(pfc.weight.grad[others] == 0)


def test_bad_labels_and_batch_sizes_are_clear_errors():
    pfc = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 4, 10)
    with pytest.raises(DataError, match="outside"):
        pfc(torch.randn(2, 4), torch.tensor([3, 10]))
    pfc = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 4, 10)
    pfc(torch.randn(4, 4), torch.tensor([1, 2, 3, 4]))
    with pytest.raises(DataError, match="same batch size"):
        pfc(torch.randn(3, 4), torch.tensor([1, 2, 3]))


def test_shard_ranges_cover_classes_contiguously():
    # arcface_torch's layout, by hand: 10 classes on 3 ranks are 4 + 3 + 3, the extra class on rank 0
    assert [shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]
    assert [shard_range(93431, r, 8)[1] for r in range(8)] == [11679] * 7 + [11678]
    for c, w in [(10, 3), (7, 7), (100, 8), (93431, 8)]:
        starts = [shard_range(c, r, w) for r in range(w)]
        assert sum(n for _, n in starts) == c
        pos = 0
        for start, n in starts:
            assert start == pos
            pos += n


# ---------------------------------------------------------------- 2 processes vs 1
def _worker(rank, world, init_file, data, options, out_q):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different global RNG per rank: the sampling must not depend on it
    x, labels, w_backbone, w_full = data
    b = x.shape[0] // world
    backbone = torch.nn.Linear(x.shape[1], w_full.shape[1], bias=False)
    with torch.no_grad():
        backbone.weight.copy_(w_backbone)
    model = DDP(backbone) if world > 1 else backbone
    pfc = PartialFC_V2(CombinedMarginLoss(64, *options["margins"]), w_full.shape[1], w_full.shape[0],
                       sample_rate=options["sample_rate"], sample_seed=options["seed"])
    with torch.no_grad():
        pfc.weight.copy_(w_full[pfc.class_start:pfc.class_start + pfc.num_local])
    xs, ls = x[rank * b:(rank + 1) * b], labels[rank * b:(rank + 1) * b]
    loss = pfc(model(xs), ls, step=options["step"])
    loss.backward()
    # numpy copies travel by value; torch tensors would travel as file descriptors that die with this process
    out_q.put((rank, float(loss.detach()), backbone.weight.grad.numpy().copy(), pfc.class_start,
               pfc.weight.grad.numpy().copy()))
    del model
    import gc
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _run(world, tmp_path, data, **options):
    options = {"margins": (1.0, 0.5, 0.0), "sample_rate": 1.0, "seed": 0, "step": 0, **options}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init_file = str(tmp_path / f"pg_{world}_{options['sample_rate']}")
    procs = [ctx.Process(target=_worker, args=(r, world, init_file, data, options, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    results = [(r, loss, torch.from_numpy(g), start, torch.from_numpy(gw)) for r, loss, g, start, gw in results]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return sorted(results, key=lambda r: r[0])


@pytest.mark.dist
def test_two_processes_equal_one_process(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 1])
    data = (x, labels, torch.randn(5, 6) * 0.3, torch.randn(7, 5) * 0.1)
    one = _run(1, tmp_path, data)
    two = _run(2, tmp_path, data)
    # float32: the shards sum their exponentials in another order than one process does
    assert rel_close(two[0][1], one[0][1], 1e-6) and two[0][1] == two[1][1]
    # DDP averaged the backbone gradient: it must equal the single-process gradient
    for r in range(2):
        assert rel_close(two[r][2], one[0][2], 1e-5)
    full_grad = one[0][4]
    for r in range(2):
        start, g = two[r][3], two[r][4]
        assert rel_close(g, full_grad[start:start + g.shape[0]], 1e-5)


@pytest.mark.dist
def test_two_sampled_shards_equal_a_plain_softmax_over_the_union_of_their_classes(tmp_path):
    torch.manual_seed(1)
    c, rate, seed, step = 40, 0.25, 5, 17
    x = torch.randn(8, 6)
    # shard 0 (classes 0-19) holds 3 positives of its 5 slots, shard 1 (20-39) 4 of 5: both sample negatives
    labels = torch.tensor([0, 3, 25, 30, 3, 10, 39, 22])
    w_backbone, w_full = torch.randn(5, 6) * 0.3, torch.randn(c, 5) * 0.1
    two = _run(2, tmp_path, (x, labels, w_backbone, w_full), sample_rate=rate, seed=seed, step=step)

    classes = sampled_global_classes(labels, c, 2, rate, seed, step)
    assert len(classes) == 10 and set(labels.tolist()) <= set(classes)
    backbone = w_backbone.clone().requires_grad_(True)
    centres = w_full[classes].clone().requires_grad_(True)
    position = {k: i for i, k in enumerate(classes)}
    ref = plain_margin_ce(x @ backbone.t(), centres, torch.tensor([position[int(y)] for y in labels]),
                          64.0, 1.0, 0.5, 0.0)
    ref.backward()
    full_grad = torch.zeros_like(w_full)
    full_grad[classes] = centres.grad
    assert int((full_grad.abs().sum(1) > 0).sum()) == 10
    for r in range(2):
        assert rel_close(two[r][1], float(ref.detach()), 1e-6)
        assert rel_close(two[r][2], backbone.grad, 1e-5)
        start, g = two[r][3], two[r][4]
        assert torch.all((g.abs().sum(1) > 0) == (full_grad[start:start + g.shape[0]].abs().sum(1) > 0))
        assert rel_close(g, full_grad[start:start + g.shape[0]], 1e-5)


def test_initial_centres_do_not_depend_on_world_size_or_the_global_rng():
    from arcface.partial_fc import INIT_CHUNK, initial_centres, shard_range
    classes, d = 2 * INIT_CHUNK + 77, 6
    whole = initial_centres(0, classes, d, seed=9)
    for world in (2, 3, 5):
        parts = [initial_centres(*shard_range(classes, r, world), d, seed=9) for r in range(world)]
        assert torch.equal(torch.cat(parts), whole)
    torch.manual_seed(0)
    first = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), d, classes, sample_seed=9).weight.detach()
    torch.rand(1000)  # another component draws from the global stream first
    second = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), d, classes, sample_seed=9).weight.detach()
    assert torch.equal(first, whole) and torch.equal(second, whole)
    assert abs(float(whole.std()) - 0.01) < 5e-4 and not torch.equal(whole, initial_centres(0, classes, d, seed=10))
