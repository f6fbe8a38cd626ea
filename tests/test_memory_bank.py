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


# ---------------------------------------------------------------- student banks (RPSD relation='student')

from plugins.ukd.student_bank import StudentQueue, StudentSlots, last_occurrence  # noqa: E402


def pair(n, d=4, start=0, seed=0):
    """(teacher, student, labels, dataset index) of n samples; the student is the teacher plus noise."""
    g = torch.Generator().manual_seed(seed + start)
    teacher, labels = numbered(n, d, start)
    student = teacher + torch.randn(n, d, generator=g)
    return teacher, student, labels, torch.arange(start, start + n)


def test_student_queue_keeps_the_student_beside_its_teacher_key_in_fifo_order():
    bank, one_by_one = StudentQueue(size=5), StudentQueue(size=5)
    teacher, student, labels, _ = pair(12)
    bank.update(teacher[:3], student[:3], labels[:3])
    bank.update(teacher[3:], student[3:], labels[3:])          # 9 more: wraps around, keeps the newest 5
    for i in range(12):
        one_by_one.update(teacher[i:i + 1], student[i:i + 1], labels[i:i + 1])
    t, s, y = bank.entries()
    assert y.tolist() == [7, 8, 9, 10, 11]
    torch.testing.assert_close(t, F.normalize(teacher[7:], dim=1))
    torch.testing.assert_close(s, F.normalize(student[7:], dim=1))
    for key, value in bank.state_dict().items():
        assert torch.equal(value, one_by_one.state_dict()[key]), key


def test_student_slots_write_by_index_and_move_with_momentum():
    bank = StudentSlots(size=10, momentum=0.75)
    teacher, student, labels, _ = pair(3, start=0)
    bank.update(teacher, student, labels, torch.tensor([2, 5, 7]))
    assert bank.valid.nonzero().flatten().tolist() == [2, 5, 7]
    torch.testing.assert_close(bank.student[5], F.normalize(student[1], dim=0))   # first visit: as is
    t2, s2, y2, _ = pair(2, start=20)
    bank.update(t2, s2, y2, torch.tensor([5, 9]))                                 # revisit slot 5, new slot 9
    expected_s = F.normalize(0.75 * F.normalize(student[1], dim=0) + 0.25 * F.normalize(s2[0], dim=0), dim=0)
    expected_t = F.normalize(0.75 * F.normalize(teacher[1], dim=0) + 0.25 * F.normalize(t2[0], dim=0), dim=0)
    torch.testing.assert_close(bank.student[5], expected_s)
    torch.testing.assert_close(bank.feats[5], expected_t)
    torch.testing.assert_close(bank.student[9], F.normalize(s2[1], dim=0))
    assert bank.labels[[2, 5, 7, 9]].tolist() == [0, 20, 2, 21] and bank.num_valid() == 4


def test_student_slots_take_the_last_view_of_a_sample_repeated_in_one_batch():
    assert last_occurrence(torch.tensor([4, 1, 4, 3, 1])).tolist() == [4, 3, 2]   # values 1, 3, 4
    bank = StudentSlots(size=6, momentum=0.0)
    teacher, student, labels, _ = pair(3)
    bank.update(teacher, student, labels, torch.tensor([1, 1, 1]))
    torch.testing.assert_close(bank.student[1], F.normalize(student[2], dim=0))


def test_student_slots_refuse_missing_or_out_of_range_indices():
    from arcface.errors import ConfigError
    bank = StudentSlots(size=4)
    teacher, student, labels, _ = pair(2)
    with pytest.raises(ConfigError, match="carries no sample indices"):
        bank.update(teacher, student, labels, None)
    with pytest.raises(ConfigError, match="one slot per training sample"):
        bank.update(teacher, student, labels, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="momentum"):
        StudentSlots(size=4, momentum=1.0)


@pytest.mark.parametrize("kind", ["queue", "slots"])
def test_student_bank_state_round_trip_into_a_fresh_bank(tmp_path, kind):
    make = (lambda: StudentQueue(size=6, fp16=True)) if kind == "queue" else (lambda: StudentSlots(size=40))
    bank = make()
    teacher, student, labels, index = pair(9, d=3)
    bank.update(teacher, student, labels, index * 3)
    torch.save(bank.state_dict(), tmp_path / "bank.pt")
    fresh = make()                                   # has not seen a batch: takes its width from the state
    fresh.load_state_dict(torch.load(tmp_path / "bank.pt"))
    for key, value in bank.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    more = pair(2, d=3, start=9)
    bank.update(*more[:3], more[3] * 3)
    fresh.update(*more[:3], more[3] * 3)
    for a, b in zip(bank.entries(), fresh.entries()):
        assert torch.equal(a, b)


def test_student_bank_resumes_with_the_checkpoint_exactly(tmp_path):
    """A KD run with the student bank (momentum slots by dataset index), the EMA hard threshold and a scale-free
    weight, killed after 7 batches and resumed from the step-5 checkpoint, ends where the uninterrupted run ends:
    the bank's teacher and student entries, the thresholds, the running scales and the student weights."""
    from easydict import EasyDict as edict

    from arcface.backbones import get_model
    from arcface.engine.trainer import train
    from engine_utils import CrashAfter, TensorLoader, make_data
    from test_trainer import tiny_cfg

    teacher_path = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(get_model("r18", num_features=16, input_size=16, width=0.25).state_dict(), teacher_path)
    losses = {"iled": {"weight": 1.0, "mode": "ema", "ratio_end": 0.1, "scale": "loss"},
              "rpsd": {"weight": 1.0, "bank": 96, "k_neg": 8, "relation": "student", "bank_update": "momentum",
                       "mining": "critical", "far": 0.01, "require_positives": False, "scale": "grad"}}

    def kd():
        return edict(enabled=True, teacher_network="r18", teacher_weights=str(teacher_path),
                     teacher_embedding_size=16, teacher_network_kwargs={"width": 0.25}, teacher_check=False,
                     losses=losses)
    images, labels = make_data()
    full = tiny_cfg(tmp_path / "a", kd=kd())
    train(full, TensorLoader(images, labels, 8))
    part = tiny_cfg(tmp_path / "b", save_every_steps=5, kd=kd())
    with pytest.raises(KeyboardInterrupt):
        train(part, CrashAfter(TensorLoader(images, labels, 8), 7))
    saved = torch.load(tmp_path / "b" / "out" / "checkpoint_gpu_0.pt", weights_only=False)
    assert saved["global_step"] == 5 and int(saved["state_plugins"]["ukd"]["composer"]["terms.rpsd.bank.valid"]
                                             .sum()) == 5 * 8
    part.resume = True
    train(part, TensorLoader(images, labels, 8))
    a = torch.load(tmp_path / "a" / "out" / "checkpoint_gpu_0.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "out" / "checkpoint_gpu_0.pt", weights_only=False)
    state_a, state_b = a["state_plugins"]["ukd"]["composer"], b["state_plugins"]["ukd"]["composer"]
    assert {"terms.rpsd.bank.student", "terms.rpsd.threshold", "terms.iled.threshold", "scalers.rpsd.mean",
            "scalers.iled.mean"} <= set(state_a)
    assert int(state_a["terms.rpsd.bank.valid"].sum()) == 96
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=1e-5, atol=1e-6, msg=key)
    for key, value in a["state_dict_backbone"].items():
        torch.testing.assert_close(b["state_dict_backbone"][key].float(), value.float(), rtol=1e-5, atol=1e-6,
                                   msg=key)
