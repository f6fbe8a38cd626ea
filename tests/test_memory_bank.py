"""The FIFO teacher memory bank: order after wrap-around, fp16 storage, state_dict round trips."""
import pytest
import torch
import torch.nn.functional as F

from plugins.ukd.memory_bank import MemoryBank


def numbered(n, d=4, start=0):
    """Embeddings whose direction encodes their number, so order can be read back from the bank."""
    ids = torch.arange(start, start + n, dtype=torch.float32)
    feats = torch.stack([ids + 1, torch.ones(n), -ids, 2 * torch.ones(n)][:d], dim=1)
    return feats, torch.arange(start, start + n)


def test_fills_in_order_then_overwrites_the_oldest():
    bank = MemoryBank(size=5)
    assert bank.dim is None and bank.num_valid() == 0 and bank.fill() == 0.0
    feats, labels = numbered(3)
    bank.enqueue(feats, labels)
    assert bank.dim == 4 and bank.num_valid() == 3 and int(bank.ptr) == 3
    got_feats, got_labels = bank.entries()
    assert got_labels.tolist() == [0, 1, 2]
    torch.testing.assert_close(got_feats, F.normalize(feats, dim=1))
    assert bank.valid.tolist() == [True, True, True, False, False]

    feats, labels = numbered(4, start=3)           # 3, 4 fill the end; 5, 6 overwrite slots 0, 1
    bank.enqueue(feats, labels)
    assert bank.labels.tolist() == [5, 6, 2, 3, 4] and int(bank.ptr) == 2 and bank.fill() == 1.0
    got_feats, got_labels = bank.entries()
    assert got_labels.tolist() == [2, 3, 4, 5, 6]  # oldest first
    torch.testing.assert_close(got_feats, F.normalize(numbered(5, start=2)[0], dim=1))


def test_a_batch_larger_than_the_bank_keeps_its_newest_entries_like_one_by_one():
    big = MemoryBank(size=4)
    one_by_one = MemoryBank(size=4)
    big.enqueue(*numbered(1))
    one_by_one.enqueue(*numbered(1))
    feats, labels = numbered(11, start=1)
    big.enqueue(feats, labels)
    for i in range(11):
        one_by_one.enqueue(feats[i:i + 1], labels[i:i + 1])
    assert big.entries()[1].tolist() == [8, 9, 10, 11]
    for key in ("feats", "labels", "valid", "ptr"):
        assert torch.equal(getattr(big, key), getattr(one_by_one, key)), key


def test_fp16_storage_halves_memory_and_keeps_unit_vectors():
    bank = MemoryBank(size=8, fp16=True)
    feats = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    bank.enqueue(feats, torch.arange(6))
    assert bank.feats.dtype == torch.float16 and bank.feats.element_size() == 2
    stored = bank.entries()[0].float()
    torch.testing.assert_close(stored, F.normalize(feats, dim=1), atol=1e-3, rtol=0)
    torch.testing.assert_close(stored.norm(dim=1), torch.ones(6), atol=2e-3, rtol=0)


def test_state_dict_round_trip_into_a_fresh_bank():
    bank = MemoryBank(size=6, fp16=True)
    bank.enqueue(*numbered(9, d=3))
    fresh = MemoryBank(size=6, fp16=True)            # has not seen a batch: takes its width from the state
    fresh.load_state_dict(bank.state_dict())
    for key, value in bank.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    fresh.enqueue(*numbered(2, d=3, start=9))       # and goes on where the saved one stopped
    assert fresh.entries()[1].tolist() == [5, 6, 7, 8, 9, 10]

    empty = MemoryBank(size=6)
    empty.load_state_dict(MemoryBank(size=6).state_dict())
    assert empty.dim is None and empty.num_valid() == 0


def test_state_survives_torch_save(tmp_path):
    bank = MemoryBank(size=4)
    bank.enqueue(*numbered(3))
    path = tmp_path / "bank.pt"
    torch.save(bank.state_dict(), path)
    fresh = MemoryBank(size=4)
    fresh.load_state_dict(torch.load(path))
    assert fresh.entries()[1].tolist() == [0, 1, 2] and int(fresh.ptr) == 3


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="positive"):
        MemoryBank(size=0)
    bank = MemoryBank(size=4, dim=3)
    with pytest.raises(ValueError, match="3-d"):
        bank.enqueue(torch.randn(2, 5), torch.arange(2))
    with pytest.raises(ValueError, match="labels"):
        bank.enqueue(torch.randn(2, 3), torch.arange(3))
