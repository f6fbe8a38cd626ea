"""Faults and hostile input in the data layer, .bin verification sets and weight files (issue 18; the teacher
cache's are in test_cache_faults.py).

Each case is what a user, a broken disk or a hostile download can hand us; each must end in a DataError /
CheckpointError / ConfigError that names the file and the place, or in correct behaviour - never a raw
traceback, never silent training on wrong data, never code run from a data file.
"""
import argparse
import io
import os
import pickle
import random
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from arcface.backbones import get_model, load_backbone_weights
from arcface.data.datasets import RecordDataset
from arcface.data.layout import read_layout
from arcface.data.recordio import IndexedRecordIO, IRHeader, RecordIO, pack, read_index
from arcface.errors import CheckpointError, DataError
from arcface.eval.embedder import build_network
from arcface.eval.verification import load_bin

SIZE = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two OpenMP threads on a shared 2-core machine are many times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def jpeg(rng, size=SIZE):
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_records(folder, records):
    """(key, label, payload) records into folder/train.rec + train.idx, in the order given."""
    os.makedirs(folder, exist_ok=True)
    writer = IndexedRecordIO(os.path.join(folder, "train.idx"), os.path.join(folder, "train.rec"), "w")
    for key, label, payload in records:
        writer.write_idx(key, pack(IRHeader(0, label, key, 0), payload))
    writer.close()
    return str(folder)


def insightface_records(image_labels, ranges=None, header=None, seed=0):
    """Records of an insightface-layout file: header, images, identity ranges (default: from the labels)."""
    rng = np.random.default_rng(seed)
    n = len(image_labels)
    if ranges is None:
        labels = np.asarray(image_labels, dtype=np.int64)
        ids = int(labels.max()) + 1
        starts = np.searchsorted(labels, np.arange(ids)) + 1
        ranges = [[int(s), int(e)] for s, e in zip(starts, list(starts[1:]) + [n + 1])]
    records = [(0, header or [n + 1, n + 1 + len(ranges)], b"")]
    records += [(k, float(image_labels[k - 1]), jpeg(rng)) for k in range(1, n + 1)]
    records += [(n + 1 + i, list(r), b"") for i, r in enumerate(ranges)]
    return records


def offsets_of(folder):
    keys, offsets = read_index(os.path.join(folder, "train.idx"))
    return dict(zip(keys.tolist(), offsets.tolist()))


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


LABEL_AT = 8 + 4  # byte offset of the float label inside a record: frame head, then the IRHeader's flag


# ---- 1. every bad value is a clear error ------------------------------------------------------------------------

def test_nan_in_the_header_record_is_a_data_error(tmp_path):
    root = write_records(tmp_path, insightface_records([0, 0, 1], header=[float("nan"), 6.0]))
    with pytest.raises(DataError, match=r"train.rec key 0: header label \[nan, 6.0\] is not"):
        read_layout(root, use_cache=False)


def test_header_record_announcing_more_images_than_the_index_holds(tmp_path):
    root = write_records(tmp_path, insightface_records([0, 0, 1], header=[1e30, 1e30]))
    with pytest.raises(DataError, match=r"train.rec key 0"):
        read_layout(root, use_cache=False)


def test_nan_label_in_a_spot_checked_image_record(tmp_path):
    """Image key 1 (the first of its identity, so spot-checked) holds a NaN label."""
    root = write_records(tmp_path, insightface_records([0, 0, 1, 1]))
    patch(os.path.join(root, "train.rec"), offsets_of(root)[1] + LABEL_AT, struct.pack("<f", float("nan")))
    with pytest.raises(DataError, match=r"key 1 at byte offset \d+: label nan is not an integer"):
        read_layout(root, use_cache=False)


def test_nan_in_an_identity_record_falls_back_to_the_image_headers(tmp_path, caplog):
    records = insightface_records([0, 0, 1, 1], ranges=[[float("nan"), 3], [3, 5]])
    root = write_records(tmp_path, records)
    layout = read_layout(root, use_cache=False)
    assert layout.label_source == "record headers" and layout.labels.tolist() == [0, 0, 1, 1]
    assert "identity record key 5" in caplog.text


@pytest.mark.parametrize("line, shown", [
    ("7\tnot-a-number\n", "not-a-number"),
    ("\x00\xff garbage\n", "garbage"),
    ("9\t99999999999999999999999\n", "99999999999999999999999"),
    ("1.5\t10\n", "1.5"),
    ("12\t34\t56\n", "12\\t34\\t56"),
])
def test_garbage_index_line_is_named_with_its_line_number(tmp_path, line, shown):
    root = write_records(tmp_path, insightface_records([0, 0, 1]))
    with open(os.path.join(root, "train.idx"), "a") as f:
        f.write(line)
    lines = 1 + 3 + 2  # header, images, identities
    with pytest.raises(DataError) as info:
        read_index(os.path.join(root, "train.idx"))
    text = str(info.value)
    assert f"train.idx line {lines + 1}" in text and shown in text, text


def test_two_bad_index_lines_cannot_cancel_out(tmp_path):
    """Three fields on one line and one on the next: an even field count, still two malformed lines."""
    root = write_records(tmp_path, insightface_records([0, 0, 1]))
    with open(os.path.join(root, "train.idx"), "a") as f:
        f.write("12\t34\t56\n78\n")
    with pytest.raises(DataError, match=r"train.idx line 7"):
        read_index(os.path.join(root, "train.idx"))


def test_index_with_blank_lines_and_crlf_still_reads(tmp_path):
    root = write_records(tmp_path, insightface_records([0, 0, 1]))
    idx = os.path.join(root, "train.idx")
    keys, offsets = read_index(idx)
    with open(idx, "w", newline="") as f:
        f.write("\r\n".join(f"{k}\t{o}" for k, o in zip(keys.tolist(), offsets.tolist())) + "\r\n\r\n")
    again = read_index(idx)
    assert again[0].tolist() == keys.tolist() and again[1].tolist() == offsets.tolist()


def test_negative_offset_in_the_index(tmp_path):
    rng = np.random.default_rng(0)
    root = write_records(tmp_path, [(k, float(k % 2), jpeg(rng)) for k in range(3)])
    with open(os.path.join(root, "train.idx"), "a") as f:
        f.write("3\t-5\n")
    with pytest.raises(DataError, match=r"train.idx.*key 3.*-5"):
        read_layout(root, use_cache=False)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return get_model("r18", num_features=16, input_size=SIZE, width=0.25).eval()


def training_checkpoint(model, path, **extra):
    """What Trainer.save wrote: upstream's keys plus plugin states and RNG states with numpy's as a numpy array
    (checkpoints of earlier versions hold them so, whatever the trainer writes now)."""
    state = {"epoch": 1, "global_step": 10, "batch_in_epoch": 0,
             "state_dict_backbone": model.state_dict(),
             "state_dict_softmax_fc": {"weight": torch.zeros(4, 16)},
             "state_optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
             "state_lr_scheduler": {"base_lrs": [0.1], "last_epoch": 10},
             "state_plugins": {}, "world_size": 1, "num_classes": 4, "network": "r18",
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    state.update(extra)
    torch.save(state, path)
    return str(path)


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_training_checkpoint_as_weights_loads_its_backbone(tmp_path):
    source = tiny_model(0)
    path = training_checkpoint(source, tmp_path / "checkpoint_gpu_0.pt")
    for what in ("teacher", "pretrained_backbone"):
        target = tiny_model(1)
        load_backbone_weights(target, path, what=what)
        assert same_weights(source, target)
    evaluated = build_network("r18", path, input_size=SIZE, network_kwargs={"width": 0.25})
    assert same_weights(source, evaluated)


def test_training_checkpoint_with_foreign_objects_says_what_to_use(tmp_path):
    source = tiny_model(0)
    path = training_checkpoint(source, tmp_path / "checkpoint_gpu_0.pt",
                               state_plugins={"custom": argparse.Namespace(a=1)})
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(tiny_model(1), path, what="teacher")
    text = str(info.value)
    for part in ("checkpoint_gpu_0.pt", "training checkpoint", "state_dict_backbone", "model.pt",
                 "argparse.Namespace"):
        assert part in text, text
    assert "nn.Module" not in text


def test_whole_module_is_still_refused(tmp_path):
    torch.save(tiny_model(0), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_backbone_weights(tiny_model(1), tmp_path / "module.pt")


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", b"PK\x03\x04" + b"\x00" * 40, b'{"a": 1}'])
def test_bad_weight_files_are_checkpoint_errors(tmp_path, content):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="weights.pt"):
        load_backbone_weights(tiny_model(), path, what="teacher")


# ---- 2. corruption that trained silently ---------------------------------------------------------------------

def test_image_header_disagreeing_with_its_identity_record_is_refused(tmp_path):
    """Key 2 sits in the middle of identity 0 (not spot-checked) but its header says 1."""
    root = write_records(tmp_path, insightface_records([0, 0, 0, 1, 1, 1]))
    offset = offsets_of(root)[2]
    patch(os.path.join(root, "train.rec"), offset + LABEL_AT, struct.pack("<f", 1.0))
    dataset = RecordDataset(root, input_size=SIZE, flip=False)
    assert dataset.layout.label_source == "identity records"
    with pytest.raises(DataError) as info:
        dataset[1]
    text = str(info.value)
    for part in ("train.rec key 2", f"byte offset {offset}", "label 1", "label 0", "identity record"):
        assert part in text, text
    lenient = RecordDataset(root, input_size=SIZE, flip=False, return_index=True, skip_bad_records=True)
    _, label, index, _ = lenient[1]
    assert (index, label) == (2, 0) and lenient.bad_records == 1


def test_edited_rec_does_not_reuse_the_stale_label_cache(tmp_path):
    rng = np.random.default_rng(0)
    root = write_records(tmp_path, [(k, float(k % 3), jpeg(rng)) for k in range(8)])
    assert read_layout(root).labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert read_layout(root).label_source == "cache"
    rec, idx = os.path.join(root, "train.rec"), os.path.join(root, "train.idx")
    stamps = [(os.stat(p).st_atime_ns, os.stat(p).st_mtime_ns) for p in (rec, idx)]
    patch(rec, offsets_of(root)[4] + LABEL_AT, struct.pack("<f", 2.0))  # same size, same .idx
    for p, stamp in zip((rec, idx), stamps):
        os.utime(p, ns=stamp)  # even with the old times back
    layout = read_layout(root)
    assert layout.label_source != "cache" and layout.labels.tolist() == [0, 1, 2, 0, 2, 2, 0, 1]


def test_stale_label_cache_missed_by_the_probe_is_caught_when_the_record_is_read(tmp_path, monkeypatch):
    from arcface.data import layout as L
    monkeypatch.setattr(L, "LABEL_CACHE_PROBES", 2, raising=False)  # probe only the first and the last record
    rng = np.random.default_rng(0)
    root = write_records(tmp_path, [(k, float(k % 3), jpeg(rng)) for k in range(8)])
    read_layout(root)
    offset = offsets_of(root)[4]
    rec = os.path.join(root, "train.rec")
    stamp = (os.stat(rec).st_atime_ns, os.stat(rec).st_mtime_ns)
    patch(rec, offset + LABEL_AT, struct.pack("<f", 2.0))
    os.utime(rec, ns=stamp)  # an edit that keeps the file's times (rsync -a of an edited copy, touch -r)
    dataset = RecordDataset(root, input_size=SIZE, flip=False)
    assert dataset.layout.label_source == "cache"
    with pytest.raises(DataError) as info:
        dataset[4]
    text = str(info.value)
    assert f"key 4 at byte offset {offset}" in text and "train.rec.labels.npy" in text and "delete" in text, text


def test_skip_bad_records_works_for_the_plain_layout_scan(tmp_path, caplog):
    rng = np.random.default_rng(0)
    root = write_records(tmp_path, [(k, float(k % 3), jpeg(rng)) for k in range(6)])
    offset = offsets_of(root)[2]
    patch(os.path.join(root, "train.rec"), offset, b"\x00\x00\x00\x00")  # wrong magic at key 2
    with pytest.raises(DataError, match=f"key 2 at byte offset {offset}: wrong magic"):
        RecordDataset(root, input_size=SIZE, flip=False)
    for attempt in range(2):  # the second start reads the label cache
        dataset = RecordDataset(root, input_size=SIZE, flip=False, return_index=True, skip_bad_records=True)
        assert len(dataset) == 5 and dataset.keys.tolist() == [0, 1, 3, 4, 5]
        assert dataset.labels.tolist() == [0, 1, 0, 1, 2] and dataset.bad_records == 1
        assert [dataset[i][1] for i in range(5)] == [0, 1, 0, 1, 2]
    assert "key 2" in caplog.text
    with pytest.raises(DataError, match="wrong magic"):  # the cache does not hide the record from a strict run
        RecordDataset(root, input_size=SIZE, flip=False)


def test_skip_bad_records_in_the_plain_scan_also_skips_non_integer_labels(tmp_path):
    rng = np.random.default_rng(0)
    root = write_records(tmp_path, [(k, 2.5 if k == 1 else float(k % 3), jpeg(rng)) for k in range(4)])
    with pytest.raises(DataError, match="label 2.5 is not an integer"):
        read_layout(root)
    layout = RecordDataset(root, input_size=SIZE, skip_bad_records=True).layout
    assert layout.image_keys.tolist() == [0, 2, 3] and layout.skipped == 1


# ---- 3. no code runs from a .bin ---------------------------------------------------------------------------------

def pairs(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [jpeg(rng) for _ in range(2 * n)], [bool(i % 2) for i in range(n)]


class Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_bin_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    bins, issame = pairs()
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps((bins, [Evil(f"touch {marker}")] + issame[1:])))
    with pytest.raises(DataError) as info:
        load_bin(path, SIZE)
    assert not marker.exists()
    text = str(info.value)
    assert "evil.bin" in text and "system" in text, text


@pytest.mark.parametrize("payload", [
    b"cbuiltins\neval\n(S'1+1'\ntR.",
    b"csubprocess\nPopen\n((S'true'\nltR.",
    b"cnumpy\nload\n(S'x'\ntR.",
])
def test_bins_calling_other_globals_are_refused(tmp_path, payload):
    path = tmp_path / "other.bin"
    path.write_bytes(payload)
    with pytest.raises(DataError, match="other.bin"):
        load_bin(path, SIZE)


def test_object_arrays_are_refused(tmp_path):
    bins, issame = pairs()
    path = tmp_path / "objects.bin"
    path.write_bytes(pickle.dumps((np.array(bins, dtype=object), issame)))
    with pytest.raises(DataError, match="objects.bin"):
        load_bin(path, SIZE)


@pytest.mark.parametrize("issame", [["yes", "no"], [2, 0], np.array([0.5, 1.0]), "ab"])
def test_issame_that_is_not_booleans_is_refused(tmp_path, issame):
    path = tmp_path / "labels.bin"
    path.write_bytes(pickle.dumps((pairs()[0], issame)))
    with pytest.raises(DataError, match="labels.bin.*issame"):
        load_bin(path, SIZE)


def python2_bin(bins, issame_pickle):
    """Protocol 2 as python 2 wrote it: the images are `str` (BINSTRING), then the issame part as given."""
    out = [b"\x80\x02", b"(", b"]", b"("]
    for blob in bins:
        out += [b"T", struct.pack("<i", len(blob)), blob]
    out += [b"e", issame_pickle, b"t", b"."]
    return b"".join(out)


PY2_BOOL_ARRAY = (b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I0\ntS'b'\ntR(I1\n(I2\ntcnumpy\ndtype\n"
                  b"(S'b1'\nI0\nI1\ntR(I3\nS'|'\nNNNI-1\nI-1\nI0\ntbI00\nS'\\x00\\x01'\ntb")


def legitimate_variants():
    bins, issame = pairs()
    arr = np.asarray(issame)
    numpy1 = pickle.dumps((bins, arr), protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    yield "py3 highest protocol", pickle.dumps((bins, issame), protocol=pickle.HIGHEST_PROTOCOL)
    for proto in range(0, 6):
        yield f"protocol {proto}", pickle.dumps((bins, issame), protocol=proto)
    yield "list pair", pickle.dumps([bins, issame])
    yield "tuple of images", pickle.dumps((tuple(bins), tuple(issame)))
    yield "numpy bool array", pickle.dumps((bins, arr))
    yield "numpy bool array, protocol 2", pickle.dumps((bins, arr), protocol=2)
    yield "numpy bool array, protocol 5", pickle.dumps((bins, arr), protocol=5)
    yield "numpy 1.x bool array", numpy1
    yield "numpy bool scalars", pickle.dumps((bins, [np.bool_(s) for s in issame]))
    yield "uint8 array images", pickle.dumps(([np.frombuffer(b, dtype=np.uint8) for b in bins], issame))
    yield "bytearray images", pickle.dumps(([bytearray(b) for b in bins], issame))
    yield "python 2", python2_bin(bins, b"]" + b"(" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e")
    yield "python 2 bool array", python2_bin(bins, PY2_BOOL_ARRAY)


@pytest.mark.parametrize("name, blob", list(legitimate_variants()), ids=[n for n, _ in legitimate_variants()])
def test_every_legitimate_bin_variant_loads(tmp_path, name, blob):
    bins, issame = pairs()
    path = tmp_path / "set.bin"
    path.write_bytes(blob)
    data = load_bin(path, SIZE)
    assert data.issame.tolist() == issame, name
    expected = np.asarray(Image.open(io.BytesIO(bins[3])).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(data.images[3], expected)


# ---- corrupted and truncated data that is refused already (must stay so) ----------------------------------------

def test_truncated_rec_is_named_by_scan_and_dataset(tmp_path):
    rng = np.random.default_rng(0)
    root = write_records(tmp_path, [(k, float(k % 2), jpeg(rng)) for k in range(4)])
    offset = offsets_of(root)[3]
    dataset = RecordDataset(root, input_size=SIZE, flip=False)
    with open(os.path.join(root, "train.rec"), "r+b") as f:
        f.truncate(offset + 20)
    with pytest.raises(DataError, match=f"key 3 at byte offset {offset}: truncated"):
        dataset[3]
    with pytest.raises(DataError, match=f"key 3 at byte offset {offset}: truncated"):
        read_layout(root, use_cache=False)


def test_index_of_another_file_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    a = write_records(tmp_path / "a", [(k, 0.0, jpeg(rng)) for k in range(3)])
    write_records(tmp_path / "b", [(k, 0.0, jpeg(rng, 24)) for k in range(3)])
    shutil.copyfile(os.path.join(tmp_path / "b", "train.idx"), os.path.join(a, "train.idx"))
    with pytest.raises(DataError, match="wrong magic|past the end"):
        read_layout(a, use_cache=False)


def test_empty_and_truncated_index(tmp_path):
    rng = np.random.default_rng(0)
    root = write_records(tmp_path, [(k, 0.0, jpeg(rng)) for k in range(3)])
    idx = os.path.join(root, "train.idx")
    text = open(idx).read()
    open(idx, "w").close()
    with pytest.raises(DataError, match="lists no records"):
        read_layout(root, use_cache=False)
    with open(idx, "w") as f:
        f.write(text.rstrip("\n").rsplit("\t", 1)[0])  # cut before the last offset: a line of one field
    with pytest.raises(DataError, match="train.idx"):
        read_layout(root, use_cache=False)


def test_record_reader_names_the_file_for_a_zero_length_frame_stream(tmp_path):
    path = tmp_path / "x.rec"
    path.write_bytes(b"\x0a\x23\xd7\xce" + b"\xff\xff\xff\x1f")  # magic, then a length far past the end
    with pytest.raises(DataError, match="x.rec.*truncated"):
        RecordIO(str(path), "r").read()


def test_junk_bins_are_data_errors(tmp_path):
    for name, blob in (("empty.bin", b""), ("junk.bin", os.urandom(64)), ("int.bin", pickle.dumps(3)),
                       ("short.bin", pickle.dumps((pairs()[0][:3], pairs()[1])))):
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(DataError, match=name):
            load_bin(path, SIZE)
