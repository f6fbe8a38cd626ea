"""Partial FC against a plain full-softmax margin cross-entropy computed independently, 1 and 2 processes."""
import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from arcface.errors import DataError
from arcface.losses import CombinedMarginLoss
from arcface.partial_fc import PartialFC_V2, shard_range


def plain_margin_ce(emb, weight, labels, s, m1, m2, m3):
    """Textbook margin softmax: cos(m1*theta + m2) - m3 on the target, times s, then cross-entropy."""
    cos = F.normalize(emb) @ F.normalize(weight).t()
    rows = []
    for i in range(cos.shape[0]):
        row = cos[i].clone()
        theta = torch.acos(row[labels[i]].clamp(-1 + 1e-7, 1 - 1e-7))
        row = torch.cat([row[:labels[i]], (torch.cos(m1 * theta + m2) - m3).view(1), row[labels[i] + 1:]])
        rows.append(row * s)
    return F.cross_entropy(torch.stack(rows), labels)


@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.0, 0.3, 0.2), (0.9, 0.4, 0.15)])
def test_full_rate_equals_plain_margin_softmax(margins):
    torch.manual_seed(0)
    b, d, c = 12, 16, 30
    emb = torch.randn(b, d, requires_grad=True)
    labels = torch.randint(0, c, (b,))
    pfc = PartialFC_V2(CombinedMarginLoss(64, *margins), d, c, sample_rate=1.0)
    loss = pfc(emb, labels)
    loss.backward()
    g_emb, g_w = emb.grad.clone(), pfc.weight.grad.clone()

    emb2 = emb.detach().clone().requires_grad_(True)
    w2 = pfc.weight.detach().clone().requires_grad_(True)
    ref = plain_margin_ce(emb2, w2, labels, 64.0, *margins)
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-4, rtol=1e-5)
    assert torch.allclose(g_emb, emb2.grad, atol=1e-5, rtol=1e-4)
    assert torch.allclose(g_w, w2.grad, atol=1e-5, rtol=1e-4)


def test_margin_forward_matches_upstream_arccos_form():
    """Forward values equal upstream's arccos/cos in-place computation (its straight-through mode too)."""
    torch.manual_seed(1)
    cos = torch.rand(5, 7) * 2 - 1
    labels = torch.tensor([0, 3, -1, 6, 2])
    for st in (False, True):
        out = CombinedMarginLoss(64, 1.0, 0.5, 0.0, straight_through=st)(cos.clone(), labels)
        expect = cos.clone()
        for i, y in enumerate(labels.tolist()):
            if y >= 0:
                expect[i, y] = math.cos(math.acos(float(cos[i, y])) + 0.5)
        assert torch.allclose(out, expect * 64, atol=1e-4)


def test_interclass_filtering_zeroes_high_non_target_logits():
    cos = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.7, 0.45], [0.6, 0.1, 0.3]])
    labels = torch.tensor([0, 1, -1])
    out = CombinedMarginLoss(1.0, 1.0, 0.0, 0.0, interclass_filtering_threshold=0.4)(cos, labels)
    expect = torch.tensor([[0.9, 0.0, 0.1], [0.2, 0.7, 0.0], [0.0, 0.1, 0.3]])
    assert torch.allclose(out, expect)


def test_sampling_keeps_all_positives_and_remaps_labels():
    torch.manual_seed(0)
    pfc = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 100, sample_rate=0.1)
    labels = torch.tensor([5, 17, 17, 93, -1, 40])
    index = pfc.sample(labels.clone())
    assert index.numel() == 10
    assert set([5, 17, 93, 40]).issubset(set(index.tolist()))
    assert torch.equal(index, index.sort()[0])
    remapped = labels.clone()
    pfc.sample(remapped) if False else None
    lab = labels.clone()
    idx = pfc.sample(lab)
    for orig, new in zip(labels.tolist(), lab.tolist()):
        if orig >= 0:
            assert int(idx[new]) == orig


def test_more_positives_than_samples_uses_positives_only():
    pfc = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 20, sample_rate=0.1)
    labels = torch.tensor([1, 2, 3, 4, 5])
    index = pfc.sample(labels.clone())
    assert index.tolist() == [1, 2, 3, 4, 5]


def test_sampled_loss_is_finite_and_backpropagates():
    torch.manual_seed(0)
    pfc = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 1000, sample_rate=0.05)
    emb = torch.randn(16, 8, requires_grad=True)
    loss = pfc(emb, torch.randint(0, 1000, (16,)))
    loss.backward()
    assert torch.isfinite(loss)
    touched = (pfc.weight.grad.abs().sum(1) > 0).sum().item()
    assert 0 < touched <= 50


def test_bad_labels_and_batch_sizes_are_clear_errors():
    pfc = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 4, 10)
    with pytest.raises(DataError, match="outside"):
        pfc(torch.randn(2, 4), torch.tensor([3, 10]))
    pfc = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 4, 10)
    pfc(torch.randn(4, 4), torch.tensor([1, 2, 3, 4]))
    with pytest.raises(DataError, match="same batch size"):
        pfc(torch.randn(3, 4), torch.tensor([1, 2, 3]))


def test_shard_ranges_cover_classes_contiguously():
    for c, w in [(10, 3), (7, 7), (100, 8), (93431, 8)]:
        starts = [shard_range(c, r, w) for r in range(w)]
        assert sum(n for _, n in starts) == c
        pos = 0
        for start, n in starts:
            assert start == pos
            pos += n


# ---------------------------------------------------------------- 2 processes vs 1
def _worker(rank, world, init_file, data, out_q):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    x, labels, w_backbone, w_full = data
    b = x.shape[0] // world
    backbone = torch.nn.Linear(x.shape[1], w_full.shape[1], bias=False)
    with torch.no_grad():
        backbone.weight.copy_(w_backbone)
    model = DDP(backbone) if world > 1 else backbone
    pfc = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), w_full.shape[1], w_full.shape[0])
    with torch.no_grad():
        pfc.weight.copy_(w_full[pfc.class_start:pfc.class_start + pfc.num_local])
    xs, ls = x[rank * b:(rank + 1) * b], labels[rank * b:(rank + 1) * b]
    loss = pfc(model(xs), ls)
    loss.backward()
    # numpy copies travel by value; torch tensors would travel as file descriptors that die with this process
    out_q.put((rank, float(loss.detach()), backbone.weight.grad.numpy().copy(), pfc.class_start,
               pfc.weight.grad.numpy().copy()))
    del model
    import gc
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _run(world, tmp_path, data):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init_file = str(tmp_path / f"pg_{world}")
    procs = [ctx.Process(target=_worker, args=(r, world, init_file, data, q)) for r in range(world)]
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
    assert abs(one[0][1] - two[0][1]) < 1e-5 and abs(two[0][1] - two[1][1]) < 1e-6
    # DDP averaged the backbone gradient: it must equal the single-process gradient
    for r in range(2):
        assert torch.allclose(two[r][2], one[0][2], atol=1e-5)
    full_grad = one[0][4]
    for r in range(2):
        start, g = two[r][3], two[r][4]
        assert torch.allclose(g, full_grad[start:start + g.shape[0]], atol=1e-6)
