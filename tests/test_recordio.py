"""RecordIO: cross-check against files written by real mxnet, round trips, split records, clear errors."""
import hashlib
import io
import json
import os
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

from arcface.data.datasets import RecordDataset
from arcface.data.layout import INSIGHTFACE, read_layout
from arcface.data.packing import write_insightface_rec
from arcface.data.recordio import IndexedRecordIO, IRHeader, RecordIO, pack, read_index, reindex, unpack
from arcface.errors import DataError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "mxnet")
MAGIC = struct.pack("<I", 0xCED7230A)


def sha1(b):
    return hashlib.sha1(b).hexdigest()


def jpeg(rng, size=16):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def expected():
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        return json.load(f)


def open_fixture():
    return IndexedRecordIO(os.path.join(FIXTURE, "train.idx"), os.path.join(FIXTURE, "train.rec"), "r")


def test_reads_mxnet_written_file_like_mxnet(expected):
    rec = open_fixture()
    assert rec.keys == expected["keys"]
    for key in rec.keys:
        want = expected["records"][str(key)]
        raw = rec.read_idx(key)
        assert sha1(raw) == want["record_sha1"], key
        header, payload = unpack(raw)
        assert (header.flag, header.id, header.id2) == (want["flag"], want["id"], want["id2"])
        got_label = header.label.tolist() if isinstance(header.label, np.ndarray) else header.label
        assert got_label == want["label"]
        assert sha1(payload) == want["payload_sha1"] and len(payload) == want["payload_len"]
    rec.close()


def test_fixture_has_split_records_and_sequential_read_matches():
    with open(os.path.join(FIXTURE, "train.rec"), "rb") as f:
        data = f.read()
    cflags = set()
    pos = 0
    while pos < len(data):  # walk the framing independently of the reader
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == 0xCED7230A
        cflags.add(lrec >> 29)
        length = lrec & ((1 << 29) - 1)
        pos += 8 + length + (-length) % 4
    assert cflags == {0, 1, 2, 3}
    seq = RecordIO(os.path.join(FIXTURE, "train.rec"), "r")
    rec = open_fixture()
    records = []
    while (buf := seq.read()) is not None:
        records.append(buf)
    assert records == [rec.read_idx(k) for k in rec.keys]


def test_our_writer_reproduces_mxnet_bytes(tmp_path, expected):
    rec = open_fixture()
    out = IndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "w")
    for key in rec.keys:
        header, payload = unpack(rec.read_idx(key))
        out.write_idx(key, pack(header, payload))  # re-packed from the parsed header, not copied bytes
    out.close()
    for name in ("train.rec", "train.idx"):
        with open(os.path.join(FIXTURE, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name


def test_pil_decode_matches_mxnet_imdecode():
    decoded = np.load(os.path.join(FIXTURE, "decoded.npy"))
    rec = open_fixture()
    for i, key in enumerate(range(1, 13)):
        _, payload = unpack(rec.read_idx(key))
        ours = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB")).astype(int)
        assert ours.shape == decoded[i].shape
        assert np.abs(ours - decoded[i]).max() <= 2, key  # same libjpeg family; allow IDCT rounding


def test_layout_of_mxnet_fixture(tmp_path):
    shutil.copy(os.path.join(FIXTURE, "train.rec"), tmp_path / "train.rec")
    shutil.copy(os.path.join(FIXTURE, "train.idx"), tmp_path / "train.idx")
    layout = read_layout(tmp_path)
    assert layout.kind == INSIGHTFACE and layout.label_source == "identity records"
    assert layout.image_keys.tolist() == list(range(1, 13))
    assert layout.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    keys, offsets = read_index(tmp_path / "train.idx")
    assert keys.tolist() == list(range(16)) and offsets[1] == 40


def test_round_trip_with_aligned_and_unaligned_magic(tmp_path):
    rng = np.random.default_rng(0)
    payloads = [b"", b"a", b"abc", MAGIC, MAGIC + MAGIC, b"abcd" + MAGIC + b"x", b"ab" + MAGIC + b"cd",
                MAGIC * 3 + b"end", rng.bytes(1001), rng.bytes(4096) + MAGIC + rng.bytes(8)]
    w = IndexedRecordIO(str(tmp_path / "r.idx"), str(tmp_path / "r.rec"), "w")
    for key, p in enumerate(payloads):
        w.write_idx(key * 10, p)
    w.close()
    assert os.path.getsize(tmp_path / "r.rec") % 4 == 0
    r = IndexedRecordIO(str(tmp_path / "r.idx"), str(tmp_path / "r.rec"), "r")
    assert r.keys == [k * 10 for k in range(len(payloads))]
    for key, p in reversed(list(enumerate(payloads))):  # random access, backwards
        assert r.read_idx(key * 10) == p
    seq = RecordIO(str(tmp_path / "r.rec"), "r")
    assert [seq.read() for _ in payloads] == payloads and seq.read() is None


def test_pack_unpack_scalar_and_array_labels():
    h, p = unpack(pack(IRHeader(0, 7.0, 3, 0), b"img"))
    assert (h.flag, h.label, h.id, h.id2, p) == (0, 7.0, 3, 0, b"img")
    h, p = unpack(pack(IRHeader(0, [5, 1, 2], 9, 4), b"xyz"))
    assert h.flag == 3 and h.label.tolist() == [5.0, 1.0, 2.0] and (h.id, h.id2, p) == (9, 4, b"xyz")
    raw = pack(IRHeader(0, 2.5, 1, 0), b"")
    assert raw == struct.pack("<IfQQ", 0, 2.5, 1, 0)
    with pytest.raises(DataError, match="shorter than"):
        unpack(b"\x00" * 10)


def test_reindex_rebuilds_identical_index(tmp_path):
    rng = np.random.default_rng(1)
    write_insightface_rec(tmp_path, [0, 0, 1, 2], [jpeg(rng) for _ in range(4)])
    with open(tmp_path / "train.idx") as f:
        original = f.read()
    os.remove(tmp_path / "train.idx")
    path, n = reindex(str(tmp_path / "train.rec"))
    assert n == 1 + 4 + 3
    with open(path) as f:
        assert f.read() == original


# ---- errors: each names the file, the key and the byte offset ---------------------------------------

def small_rec(tmp_path, labels=(0, 0, 1, 1), size=16):
    rng = np.random.default_rng(2)
    write_insightface_rec(tmp_path, list(labels), [jpeg(rng, size) for _ in labels])
    keys, offsets = read_index(tmp_path / "train.idx")
    return dict(zip(keys.tolist(), offsets.tolist()))


def test_truncated_record(tmp_path):
    offsets = small_rec(tmp_path)
    with open(tmp_path / "train.rec", "r+b") as f:
        f.truncate(offsets[3] + 100)
    r = RecordIO(str(tmp_path / "train.rec"), "r")
    with pytest.raises(DataError) as e:
        r.read_at(offsets[3], key=3)
    msg = str(e.value)
    assert "train.rec" in msg and "key 3" in msg and f"offset {offsets[3]}" in msg and "truncated" in msg


def test_wrong_magic(tmp_path):
    offsets = small_rec(tmp_path)
    ds = RecordDataset(tmp_path, input_size=16, flip=False, num_classes=2)  # layout read while intact
    with open(tmp_path / "train.rec", "r+b") as f:
        f.seek(offsets[2])
        f.write(b"\x00\x00\x00\x00")
    for call in (lambda: ds[1], lambda: read_layout(tmp_path, use_cache=False)):  # dataset index 1 = key 2
        with pytest.raises(DataError) as e:
            call()
        msg = str(e.value)
        assert "wrong magic" in msg and "key 2" in msg and f"offset {offsets[2]}" in msg and "train.rec" in msg


def test_index_past_end_of_file(tmp_path):
    small_rec(tmp_path)
    with open(tmp_path / "train.idx", "a") as f:
        f.write("99\t10000000\n")
    with pytest.raises(DataError, match=r"key 99 points to byte 10000000, past the end"):
        read_layout(tmp_path)
    with pytest.raises(DataError, match="key 99"):
        IndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "r")


def test_missing_index_says_how_to_rebuild(tmp_path):
    small_rec(tmp_path)
    os.remove(tmp_path / "train.idx")
    for call in (lambda: read_layout(tmp_path),
                 lambda: IndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "r")):
        with pytest.raises(DataError) as e:
            call()
        assert "train.idx" in str(e.value) and "pack_rec.py reindex" in str(e.value)


def test_malformed_index_line(tmp_path):
    small_rec(tmp_path)
    with open(tmp_path / "train.idx", "a") as f:
        f.write("7\tnot-a-number\n")
    with pytest.raises(DataError, match="not an integer"):
        read_index(tmp_path / "train.idx")


def test_undecodable_image(tmp_path):
    w = IndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "w")
    rng = np.random.default_rng(3)
    w.write_idx(0, pack(IRHeader(0, 0.0, 0, 0), jpeg(rng)))
    w.write_idx(1, pack(IRHeader(0, 1.0, 1, 0), b"\xff\xd8\xff" + b"garbage" * 20))
    w.close()
    offset = read_index(tmp_path / "train.idx")[1][1]
    ds = RecordDataset(tmp_path, input_size=16, flip=False)
    assert ds[0][1] == 0
    with pytest.raises(DataError) as e:
        ds[1]
    msg = str(e.value)
    assert "undecodable image" in msg and "key 1" in msg and f"offset {offset}" in msg and "train.rec" in msg


def test_label_outside_num_classes(tmp_path):
    offsets = small_rec(tmp_path, labels=(0, 1, 2, 3))
    read_layout(tmp_path, num_classes=4)
    with pytest.raises(DataError) as e:
        read_layout(tmp_path, num_classes=3)
    msg = str(e.value)
    assert "key 4" in msg and f"offset {offsets[4]}" in msg and "label 3" in msg and "num_classes=3" in msg
    with pytest.raises(DataError, match="key 4"):
        RecordDataset(tmp_path, num_classes=3)


def test_writer_refuses_reads_and_reader_refuses_writes(tmp_path):
    w = RecordIO(str(tmp_path / "a.rec"), "w")
    with pytest.raises(DataError):
        w.read()
    w.close()
    r = RecordIO(str(tmp_path / "a.rec"), "r")
    with pytest.raises(DataError):
        r.write(b"x")
    with pytest.raises(DataError, match="not found"):
        RecordIO(str(tmp_path / "missing.rec"), "r")

