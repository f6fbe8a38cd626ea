"""Faults and hostile input in the teacher embedding cache (issue 18): flipped bytes, NaN rows, negative norms,
old format versions, damage during a build, unreadable records skipped alike by the build and by training.

Each must end in an error that names the file and the chunk or row - never a NaN teacher that later fails as
"try a lower lr".
"""
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from easydict import EasyDict as edict

from arcface.config import base_config, validate
from arcface.data.packing import write_insightface_rec
from arcface.engine.hooks import TrainContext
from arcface.errors import ConfigError, DataError
from plugins.ukd import cache as C
from plugins.ukd.cache import file_format
from plugins.ukd.teacher_backends import build_teacher_backend

from test_data_faults import SIZE, jpeg, offsets_of, patch, tiny_model, write_records


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two OpenMP threads on a shared 2-core machine are many times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


N, DIM, BATCH, CHUNK = 10, 16, 2, 4


def make_cfg(rec, teacher, cache, **kw):
    cfg = base_config()
    cfg.update(dict(rec=str(rec), num_classes=3, network="mbf", embedding_size=DIM, input_size=SIZE,
                    network_kwargs={"width": 0.25}, batch_size=BATCH, num_workers=0, device="cpu", fp16=False,
                    val_targets=[], output="/tmp/unused"))
    cfg.kd = edict(enabled=True, teacher_network="r18", teacher_weights=str(teacher), teacher_embedding_size=DIM,
                   teacher_network_kwargs={"width": 0.25}, teacher_check=False, teacher_cache=str(cache),
                   teacher_backend="cache", losses={"l2": {"weight": 1.0}})
    cfg.update(kw)
    return validate(cfg)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tcache")
    rng = np.random.default_rng(0)
    labels = sorted(i % 3 for i in range(N))
    write_insightface_rec(tmp / "rec", labels, [jpeg(rng) for _ in labels], image_size=(SIZE, SIZE))
    torch.save(tiny_model(0).state_dict(), tmp / "teacher.pt")
    cfg = make_cfg(tmp / "rec", tmp / "teacher.pt", tmp / "teacher.tcache")
    C.build_teacher_cache(cfg, batch_size=BATCH, chunk_size=CHUNK, progress=False)
    return edict(tmp=tmp, cfg=cfg, out=str(tmp / "teacher.tcache"))


def copy_cache(built, tmp_path):
    path = str(tmp_path / "copy.tcache")
    shutil.copyfile(built.out, path)
    return path


def start_backend(built, path):
    cfg = make_cfg(built.cfg.rec, built.cfg.kd.teacher_weights, path)
    ctx = TrainContext(cfg=cfg, backbone=None, device=torch.device("cpu"), rank=0, world_size=1)
    return build_teacher_backend(cfg.kd, cfg, ctx)


def test_intact_cache_opens_and_reads(built):
    backend = start_backend(built, built.out)
    rows = backend(torch.zeros(N, 3, SIZE, SIZE), index=torch.arange(N), flip=torch.zeros(N, dtype=torch.bool))
    assert torch.isfinite(rows).all()


@pytest.mark.parametrize("where", ["embeddings", "norms"])
def test_flipped_byte_is_found_when_opened_for_training(built, tmp_path, where):
    path = copy_cache(built, tmp_path)
    header = C.read_header(path)[0]
    row = 6  # in chunk 1 (rows 4..7)
    area = header["arrays"][where]
    row_bytes = int(np.prod(area["shape"][1:])) * (2 if where == "embeddings" else 4)
    with open(path, "r+b") as f:
        f.seek(area["offset"] + row * row_bytes + 1)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(DataError) as info:
        start_backend(built, path)
    text = str(info.value)
    assert path in text and "chunk 1" in text and "rows 4..7" in text and "rebuild" in text, text


def test_damaged_header_is_found(built, tmp_path):
    path = copy_cache(built, tmp_path)
    with open(path, "rb") as f:
        head = f.read(file_format.HEADER_BYTES)
    at = head.index(b'"rec":"') + len(b'"rec":"') + 1
    patch(path, at, bytes([head[at] ^ 0x01]))  # a character of the recorded data path: JSON still valid
    with pytest.raises((DataError, ConfigError), match="header"):
        start_backend(built, path)


def write_row(path, row, view, unit=None, norm=None):
    cache = C.CacheFile.open(path, writable=True)
    if unit is not None:
        cache.embeddings[row, view] = unit
    if norm is not None:
        cache.norms[row, view] = norm
    cache.flush()
    del cache


@pytest.mark.parametrize("unit, norm, text", [
    (np.nan, None, "not finite"),
    (None, -1.0, "norm"),
    (None, 0.0, "norm"),
    (None, np.inf, "norm"),
])
def test_bad_rows_are_refused_when_read(built, tmp_path, unit, norm, text):
    """Rows damaged behind the checksums' back (e.g. by an older build) are still refused on lookup."""
    path = copy_cache(built, tmp_path)
    write_row(path, 5, 1, unit=unit, norm=norm)
    cache = C.CacheFile.open(path)
    ok = cache.lookup([4, 5], [True, False])  # the damaged view of row 5 is not asked for
    assert torch.isfinite(ok).all()
    with pytest.raises(DataError) as info:
        cache.lookup([4, 5], [False, True])
    message = str(info.value)
    assert path in message and "sample 5" in message and "flipped" in message and text in message, message


def test_missing_rows_keep_their_own_message(built, tmp_path):
    path = copy_cache(built, tmp_path)
    write_row(path, 3, 0, unit=np.nan, norm=np.nan)
    with pytest.raises(DataError, match="sample 3 has no embedding"):
        C.CacheFile.open(path).lookup([3], [False])


def test_version_1_cache_is_refused_with_a_rebuild_message(built, tmp_path):
    path = copy_cache(built, tmp_path)
    header = C.read_header(path)[0]
    header["version"] = 1
    blob = file_format.header_bytes(header)
    patch(path, 8, struct.pack("<Q", len(blob)) + blob)
    with pytest.raises(ConfigError) as info:
        start_backend(built, path)
    text = str(info.value)
    assert "version 1" in text and "rebuild" in text and "cache_teacher" in text, text


def test_truncated_and_junk_caches_stay_refused(built, tmp_path):
    path = copy_cache(built, tmp_path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(ConfigError, match="truncated"):
        start_backend(built, path)
    junk = tmp_path / "junk.tcache"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ConfigError, match="not a teacher cache"):
        start_backend(built, str(junk))


def test_damage_during_a_build_is_found_before_the_file_is_complete(built, tmp_path, monkeypatch):
    """A chunk whose bytes change between its write and the commit (a disk, a shared file system) is not marked
    complete: the build says which chunk and a rerun rebuilds it."""
    out = str(tmp_path / "damaged.tcache")
    cfg = make_cfg(built.cfg.rec, built.cfg.kd.teacher_weights, out)
    real_commit = C.build._commit

    def damage_then_commit(path, header, digest):
        write_row(path, 1, 0, unit=np.full(DIM, 0.25, dtype=np.float16))
        return real_commit(path, header, digest)

    monkeypatch.setattr(C.build, "_commit", damage_then_commit)
    with pytest.raises(DataError, match="chunk 0"):
        C.build_teacher_cache(cfg, batch_size=BATCH, chunk_size=CHUNK, progress=False)
    assert not C.read_header(out)[1]
    monkeypatch.setattr(C.build, "_commit", real_commit)
    C.build_teacher_cache(cfg, batch_size=BATCH, chunk_size=CHUNK, progress=False)
    with open(out, "rb") as a, open(built.out, "rb") as b:
        assert a.read()[file_format.HEADER_BYTES:] == b.read()[file_format.HEADER_BYTES:]


def test_cache_build_and_training_skip_the_same_unreadable_plain_records(built, tmp_path):
    rng = np.random.default_rng(0)
    root = write_records(tmp_path / "rec", [(k, float(k % 3), jpeg(rng)) for k in range(6)])
    patch(os.path.join(root, "train.rec"), offsets_of(root)[2], b"\x00\x00\x00\x00")
    out = str(tmp_path / "skip.tcache")
    cfg = make_cfg(root, built.cfg.kd.teacher_weights, out, skip_bad_records=True)
    C.build_teacher_cache(cfg, batch_size=BATCH, chunk_size=CHUNK, progress=False)
    assert C.CacheFile.open(out).num_images == 5
    ctx = TrainContext(cfg=cfg, backbone=None, device=torch.device("cpu"), rank=0, world_size=1)
    backend = build_teacher_backend(cfg.kd, cfg, ctx)
    assert backend(torch.zeros(5, 3, SIZE, SIZE), index=torch.arange(5),
                   flip=torch.zeros(5, dtype=torch.bool)).shape == (5, DIM)
