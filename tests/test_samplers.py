"""DistributedSampler (upstream order, padding, resume) and PKBatchSampler (P x K structure, rank balance)."""
import math

import numpy as np
import pytest
import torch

from arcface.data.samplers import DistributedSampler, PKBatchSampler, hash64
from arcface.errors import ConfigError


def upstream_order(n, rank, world, seed, epoch):
    """arcface_torch utils_distributed_sampler.DistributedSampler.__iter__, written out plainly."""
    g = torch.Generator()
    g.manual_seed(epoch + seed)
    indices = torch.randperm(n, generator=g).tolist()
    total = math.ceil(n / world) * world
    indices = (indices * math.ceil(total / len(indices)))[:total]
    return indices[rank:total:world]


@pytest.mark.parametrize("n,world", [(10, 1), (10, 3), (7, 4), (3, 8), (1000, 8)])
def test_distributed_sampler_matches_upstream(n, world):
    for epoch in (0, 3):
        for rank in range(world):
            s = DistributedSampler(n, rank, world, seed=2048)
            s.set_epoch(epoch)
            got = list(s)
            assert got == upstream_order(n, rank, world, 2048, epoch)
            assert len(s) == len(got) == math.ceil(n / world)


def test_distributed_sampler_covers_everything_and_epochs_differ():
    n, world = 101, 4
    per_rank = []
    for rank in range(world):
        s = DistributedSampler(n, rank, world, seed=1)
        per_rank.append(list(s))
    assert len({len(p) for p in per_rank}) == 1
    assert set().union(*map(set, per_rank)) == set(range(n))
    s = DistributedSampler(n, 0, 1, seed=1)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != e0 and sorted(list(s)) == sorted(e0)
    s.set_epoch(0)
    assert list(s) == e0
    assert list(DistributedSampler(5, 0, 1, shuffle=False)) == [0, 1, 2, 3, 4]


def test_distributed_sampler_resume_mid_epoch():
    n, world, bs = 103, 2, 8
    for rank in range(world):
        s = DistributedSampler(n, rank, world, seed=5, batch_size=bs)
        s.set_epoch(2)
        full = list(s)
        s.set_epoch(2, start_batch=3)
        assert list(s) == full[3 * bs:] and len(s) == len(full) - 3 * bs
        s.set_start(0)
        assert list(s) == full
    with pytest.raises(ConfigError):
        s.set_start(100)


def grouped_labels(counts):
    return np.repeat(np.arange(len(counts)), counts)


def test_pk_batches_have_p_identities_of_k_images():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 12, size=60)
    labels = rng.permutation(grouped_labels(counts))  # shuffled file order
    s = PKBatchSampler(labels, batch_size=16, k=4, seed=3)
    assert (s.p, s.n_fill) == (4, 0)
    batches = list(s)
    assert len(batches) == len(s) == labels.size // 16
    for b in batches:
        assert len(b) == 16
        groups = np.asarray(b).reshape(4, 4)
        for g in groups:
            lab = labels[g]
            assert (lab == lab[0]).all()
            if counts[lab[0]] >= 4:
                assert len(set(g.tolist())) == 4  # without replacement when the identity has enough images
    # identities of one global batch are distinct unless the schedule wraps inside it
    distinct = [len({labels[b[i]] for i in range(0, 16, 4)}) for b in batches]
    assert np.mean(np.array(distinct) == 4) > 0.8


def test_pk_visits_walk_through_all_images_of_an_identity():
    counts = [8] * 4  # 4 ids x 8 images, K=4: each identity is visited twice per epoch, 8 distinct images
    labels = grouped_labels(counts)
    s = PKBatchSampler(labels, batch_size=8, k=4, seed=11)
    seen = {}
    for b in s:
        for i in b:
            seen.setdefault(labels[i], []).append(i)
    for ident, images in seen.items():
        assert sorted(images) == list(range(8 * ident, 8 * ident + 8))


def test_pk_small_identities_sampled_with_replacement_from_themselves():
    labels = grouped_labels([1, 2, 2, 1, 3])
    s = PKBatchSampler(labels, batch_size=3 * 3, k=3, seed=0)
    for b in s:
        for g in np.asarray(b).reshape(3, 3):
            assert (labels[g] == labels[g[0]]).all()


def test_pk_random_fill_and_rank_balance():
    labels = grouped_labels(np.full(50, 6))
    world = 3
    samplers = [PKBatchSampler(labels, 20, 4, rank=r, world_size=world, seed=9, random_fraction=0.25)
                for r in range(world)]
    assert samplers[0].p == 3 and samplers[0].n_fill == 8  # 20 - floor(20 * .25) = 15 -> 3 x 4, fill 5 + 3
    lengths = {len(list(s)) for s in samplers}
    assert lengths == {300 // (20 * world)}
    # rank r takes global batches r, r + W, ... of one shared identity schedule (a permutation of the ids
    # per cycle): 5 batches x 3 ranks x 3 groups = 45 slots < 50 ids, so no identity repeats across ranks
    per_rank = [list(s) for s in samplers]
    slots = []
    for b in range(5):
        for r in range(world):
            batch = per_rank[r][b]
            assert len(batch) == 20 and all(0 <= i < 300 for i in batch)
            slots.extend(labels[batch[j]] for j in range(0, 12, 4))
    assert len(slots) == 45 and len(set(slots)) == 45


def test_pk_deterministic_epochs_and_resume():
    rng = np.random.default_rng(4)
    labels = rng.permutation(grouped_labels(rng.integers(1, 9, size=40)))
    s = PKBatchSampler(labels, 12, 3, rank=1, world_size=2, seed=21, random_fraction=0.2)
    s.set_epoch(5)
    full = list(s)
    s.set_epoch(5, start_batch=2)
    assert list(s) == full[2:] and len(s) == len(full) - 2
    s.set_epoch(6)
    assert list(s) != full
    s.set_epoch(5)
    assert list(s) == full
    other = PKBatchSampler(labels, 12, 3, rank=0, world_size=2, seed=21, random_fraction=0.2)
    other.set_epoch(5)
    assert list(other) != full


def test_pk_errors_and_scale():
    with pytest.raises(ConfigError):
        PKBatchSampler(np.zeros(10, int), batch_size=3, k=4)
    with pytest.raises(ConfigError):
        PKBatchSampler(np.zeros(10, int), batch_size=8, k=4, random_fraction=1.5)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 20000, size=300_000)  # builds and draws an epoch without per-sample loops
    s = PKBatchSampler(labels, 128, 4, rank=0, world_size=2, seed=0, random_fraction=0.1)
    out = s.epoch_batches()
    assert out.shape == (300_000 // 256, 128)
    assert s.num_ids == np.unique(labels).size
    d = DistributedSampler(300_000, 1, 2, seed=0, batch_size=128)
    assert d.epoch_indices().size == 150_000


def test_hash64_is_a_pure_function():
    a = hash64(1, 2, np.arange(1000))
    assert (a == hash64(1, 2, np.arange(1000))).all()
    assert (a != hash64(1, 3, np.arange(1000))).mean() > 0.99
    assert np.unique(a).size == 1000
    bits = (a >> np.uint64(63)).astype(int)
    assert 0.4 < bits.mean() < 0.6


def test_stable_label_order_equals_stable_argsort():
    from arcface.data.samplers import stable_label_order
    rng = np.random.default_rng(5)
    for labels in (rng.integers(0, 300, 5000), rng.integers(0, 200_000, 5000), np.sort(rng.integers(0, 9, 100)),
                   rng.integers(-5, 5, 1000), np.array([3])):
        assert (stable_label_order(labels) == np.argsort(labels, kind="stable")).all()
