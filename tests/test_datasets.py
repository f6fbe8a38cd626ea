"""Layout detection and label cache, datasets, loader dispatch, packing tools."""
import hashlib
import importlib.util
import io
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from easydict import EasyDict as edict
from PIL import Image

from arcface.data.datasets import (ImageFolderDataset, RecordDataset, SyntheticDataset, flip_decisions)
from arcface.data.layout import INSIGHTFACE, PLAIN, read_layout
from arcface.data.loader import Batch, get_dataloader
from arcface.data.packing import (describe_rec, dump_images, pack_folder, pack_list, shuffle_rec,
                                  write_insightface_rec)
from arcface.data.recordio import IndexedRecordIO, IRHeader, pack, read_index, unpack
from arcface.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jpeg(rng, size=16):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def expected_tensor(payload, flip, size=None):
    """Independent reference: PIL decode -> numpy -> (x - 127.5) / 127.5, CHW."""
    img = Image.open(io.BytesIO(payload)).convert("RGB")
    if size and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img).astype(np.float32)
    if flip:
        arr = arr[:, ::-1]
    return torch.from_numpy(((arr - 127.5) / 127.5).transpose(2, 0, 1).copy())


@pytest.fixture
def rec_dir(tmp_path):
    rng = np.random.default_rng(0)
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    payloads = [jpeg(rng) for _ in labels]
    write_insightface_rec(tmp_path / "rec", labels, payloads, image_size=(16, 16))
    return tmp_path / "rec", np.array(labels), payloads


def image_folder(root, counts, size=16, seed=0):
    rng = np.random.default_rng(seed)
    for c, n in enumerate(counts):
        d = root / f"person_{c:02d}"
        d.mkdir(parents=True)
        for j in range(n):
            small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
            small.resize((size, size), Image.BILINEAR).save(d / f"{j}.png")  # smooth: JPEG keeps it close
    return root


# ---- layout ------------------------------------------------------------------------------------

def test_insightface_layout_labels_from_identity_records_and_cache(rec_dir):
    root, labels, _ = rec_dir
    layout = read_layout(root)
    assert layout.kind == INSIGHTFACE and layout.label_source == "identity records"
    assert layout.image_keys.tolist() == list(range(1, 11)) and layout.labels.tolist() == labels.tolist()
    assert layout.labels.dtype == np.int64 and layout.num_classes == 4
    assert os.path.isfile(str(root / "train.rec") + ".labels.npy")
    again = read_layout(root)
    assert again.label_source == "cache" and again.labels.tolist() == labels.tolist()
    # the cache is stale once the .idx changes (size or mtime)
    time.sleep(0.01)
    with open(root / "train.idx", "a") as f:
        f.write("")
    os.utime(root / "train.idx", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert read_layout(root).label_source == "identity records"


def test_stale_cache_with_wrong_labels_is_not_used(rec_dir):
    root, labels, _ = rec_dir
    read_layout(root)
    cache = str(root / "train.rec") + ".labels.npy"
    arr = np.load(cache)
    arr[4:] = 99
    arr[2] -= 1  # another mtime: must be ignored
    np.save(cache, arr)
    assert read_layout(root).labels.tolist() == labels.tolist()


def test_header_scan_when_identity_records_disagree(tmp_path):
    """Identity records listed in another order than the class ids: labels come from the image headers."""
    rng = np.random.default_rng(1)
    labels = [1, 1, 0, 0, 0]  # grouped, but class 1 first
    w = IndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "w")
    w.write_idx(0, pack(IRHeader(0, [6, 8], 0, 0), b""))
    for key, lab in enumerate(labels, start=1):
        w.write_idx(key, pack(IRHeader(0, [float(lab), 1.0], key, 0), jpeg(rng)))  # array labels (face2rec2)
    w.write_idx(6, pack(IRHeader(0, [1, 3], 6, 0), b""))
    w.write_idx(7, pack(IRHeader(0, [3, 6], 7, 0), b""))
    w.close()
    layout = read_layout(tmp_path, use_cache=False)
    assert layout.label_source == "record headers" and layout.labels.tolist() == labels


def test_plain_layout_every_key_is_an_image(tmp_path):
    rng = np.random.default_rng(2)
    w = IndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "w")
    labs = [3, 0, 2, 2, 1]
    for key, lab in enumerate(labs):  # im2rec: no header, key 0 is an image
        w.write_idx(key, pack(IRHeader(0, float(lab), key, 0), jpeg(rng)))
    w.close()
    layout = read_layout(tmp_path)
    assert layout.kind == PLAIN and layout.label_source == "record headers"
    assert layout.image_keys.tolist() == [0, 1, 2, 3, 4] and layout.labels.tolist() == labs
    ds = RecordDataset(tmp_path, input_size=16, flip=False)
    assert [ds[i][1] for i in range(5)] == labs


def test_non_integer_label_is_refused(tmp_path):
    rng = np.random.default_rng(2)
    w = IndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "w")
    w.write_idx(0, pack(IRHeader(0, 1.0, 0, 0), jpeg(rng)))
    w.write_idx(1, pack(IRHeader(0, 2.5, 1, 0), jpeg(rng)))
    w.close()
    with pytest.raises(DataError, match=r"key 1 .*label 2.5 is not an integer"):
        read_layout(tmp_path)


# ---- datasets ----------------------------------------------------------------------------------

def test_record_dataset_pixels_labels_and_flips(rec_dir):
    root, labels, payloads = rec_dir
    ds = RecordDataset(root, input_size=16, flip=True, return_index=True, seed=7)
    assert len(ds) == 10
    flips_seen = set()
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        want_flips = flip_decisions(7, epoch, np.arange(10))
        for i in range(10):
            img, label, index, flipped = ds[i]
            assert (label, index, flipped) == (labels[i], i, bool(want_flips[i]))
            assert img.dtype == torch.float32 and img.shape == (3, 16, 16)
            torch.testing.assert_close(img, expected_tensor(payloads[i], flipped), atol=1e-6, rtol=0)
            flips_seen.add(flipped)
    assert flips_seen == {True, False}
    no_flip = RecordDataset(root, input_size=16, flip=False)
    assert all(not no_flip.flips([i])[0] for i in range(10)) and len(no_flip[0]) == 2


def test_record_dataset_resizes_to_input_size(rec_dir):
    root, _, payloads = rec_dir
    ds = RecordDataset(root, input_size=24, flip=False)
    img, _ = ds[3]
    assert img.shape == (3, 24, 24)
    torch.testing.assert_close(img, expected_tensor(payloads[3], False, 24), atol=1e-6, rtol=0)


def write_with_bad_record(tmp_path):
    rng = np.random.default_rng(3)
    w = IndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "w")
    for key in range(6):
        payload = b"not an image at all" if key == 2 else jpeg(rng)
        w.write_idx(key, pack(IRHeader(0, float(key % 3), key, 0), payload))
    w.close()
    return tmp_path


def test_bad_record_raises_or_is_skipped_and_counted(tmp_path):
    root = write_with_bad_record(tmp_path)
    strict = RecordDataset(root, input_size=16, flip=False)
    with pytest.raises(DataError, match="key 2 at byte offset"):
        strict[2]
    lenient = RecordDataset(root, input_size=16, flip=False, return_index=True, skip_bad_records=True)
    img, label, index, _ = lenient[2]
    assert index == 3 and label == 0 and lenient.bad_records == 1
    torch.testing.assert_close(img, lenient[3][0])
    # counted across DataLoader worker processes too
    lenient2 = RecordDataset(root, input_size=16, flip=False, skip_bad_records=True)
    loader = torch.utils.data.DataLoader(lenient2, batch_size=3, num_workers=1)
    got = [lab for _, labs in loader for lab in labs.tolist()]
    assert got == [0, 1, 0, 0, 1, 2] and lenient2.bad_records == 1


def test_image_folder_dataset(tmp_path):
    root = image_folder(tmp_path / "imgs", [2, 3, 1])
    (tmp_path / "imgs" / "person_00" / "notes.txt").write_text("ignored")
    ds = ImageFolderDataset(root, input_size=16, flip=False, return_index=True)
    assert ds.classes == ["person_00", "person_01", "person_02"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 1, 2] and len(ds) == 6
    img, label, index, flipped = ds[4]
    with open(root / "person_01" / "2.png", "rb") as f:
        torch.testing.assert_close(img, expected_tensor(f.read(), False))
    assert (label, index, flipped) == (1, 4, False)
    with pytest.raises(DataError, match="num_classes=2"):
        ImageFolderDataset(root, num_classes=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")


def test_synthetic_dataset_is_upstreams():
    ds = SyntheticDataset(length=50, input_size=32, seed=0)
    img0, l0 = ds[0]
    img1, l1 = ds[49]
    assert len(ds) == 50 and l0 == l1 == 1 and img0.shape == (3, 32, 32) and torch.equal(img0, img1)
    assert -1.0 <= img0.min() < -0.9 and 0.9 < img0.max() <= 1.0
    assert ds.labels.shape == (50,) and (ds.labels == 1).all()


# ---- loader ------------------------------------------------------------------------------------

def cfg_for(rec, **kw):
    c = edict(rec=str(rec), batch_size=4, num_workers=0, seed=3, flip=True, input_size=16, sampler="random",
              pk_k=2, pk_random_fraction=0.0, skip_bad_records=False, dali=False, dali_aug=False,
              num_classes=None, num_image=None)
    c.update(kw)
    return c


def test_loader_dispatch_and_batches(rec_dir, tmp_path, caplog):
    root, labels, payloads = rec_dir
    loader = get_dataloader(cfg_for(root, num_classes=4), 0, 1, "cpu")
    assert isinstance(loader.dataset, RecordDataset) and len(loader) == 2 and loader.num_samples == 10
    assert loader.labels.tolist() == labels.tolist()
    batches = list(loader)
    assert len(batches) == 2
    for b in batches:
        assert isinstance(b, Batch) and b.images.shape == (4, 3, 16, 16) and b.labels.dtype == torch.int64
        assert b.index.dtype == torch.int64 and b.flip.dtype == torch.bool
        assert b.labels.tolist() == labels[b.index.numpy()].tolist()
        for j in range(4):
            i = int(b.index[j])
            torch.testing.assert_close(b.images[j], expected_tensor(payloads[i], bool(b.flip[j])))
    folder = get_dataloader(cfg_for(image_folder(tmp_path / "f", [3, 3])), 0, 1, "cpu")
    assert isinstance(folder.dataset, ImageFolderDataset) and len(folder) == 1
    synth = get_dataloader(cfg_for("synthetic", num_image=12), 0, 1, "cpu")
    assert isinstance(synth.dataset, SyntheticDataset) and len(synth) == 3
    b = next(iter(synth))
    assert (b.labels == 1).all() and not b.flip.any()
    with caplog.at_level(logging.WARNING):
        get_dataloader(cfg_for(root, num_image=12345), 0, 1, "cpu")
    assert "num_image=12345" in caplog.text and "10 images" in caplog.text


def test_loader_errors(rec_dir, tmp_path):
    root, _, _ = rec_dir
    with pytest.raises(DataError, match="train.rec and train.idx"):
        get_dataloader(cfg_for(tmp_path / "nope"), 0, 1, "cpu")
    os.remove(root / "train.idx")
    with pytest.raises(DataError, match="reindex"):
        get_dataloader(cfg_for(root), 0, 1, "cpu")
    with pytest.raises(ConfigError, match="dali=True needs"):
        get_dataloader(cfg_for(image_folder(tmp_path / "f", [2]), dali=True), 0, 1, "cpu")
    with pytest.raises(DataError, match="fewer than one batch"):
        get_dataloader(cfg_for(tmp_path / "f", batch_size=8), 0, 1, "cpu")
    with pytest.raises(DataError, match="key 2 .*label 1 outside .*num_classes=1"):
        os.rename(root / "train.rec", root / "x.rec")
        write_insightface_rec(root, [0, 1], [jpeg(np.random.default_rng(0))] * 2)
        get_dataloader(cfg_for(root, num_classes=1, batch_size=1), 0, 1, "cpu")


def test_loader_ranks_resume_and_workers(rec_dir):
    root, _, _ = rec_dir
    per_rank = []
    for rank in range(2):
        loader = get_dataloader(cfg_for(root, batch_size=2, num_workers=0), rank, 2, "cpu")
        assert len(loader) == 2  # 10 images / 2 ranks = 5 -> 2 full batches of 2
        loader.set_epoch(1)
        full = [b.index.tolist() for b in loader]
        per_rank.append(full)
        loader.set_epoch(1, start_batch=1)
        assert [b.index.tolist() for b in loader] == full[1:]
    assert not set(sum(per_rank[0], [])) & set(sum(per_rank[1], []))
    # workers give the same samples and flips as the main process
    w0 = get_dataloader(cfg_for(root, num_workers=0), 0, 1, "cpu")
    w2 = get_dataloader(cfg_for(root, num_workers=2), 0, 1, "cpu")
    for loader in (w0, w2):
        loader.set_epoch(4)
    a, b = list(w0), list(w2)
    for x, y in zip(a, b):
        assert torch.equal(x.index, y.index) and torch.equal(x.flip, y.flip) and torch.equal(x.images, y.images)


def test_loader_pk_sampler(rec_dir):
    root, labels, _ = rec_dir
    loader = get_dataloader(cfg_for(root, sampler="pk", pk_k=2, batch_size=4), 0, 1, "cpu")
    assert len(loader) == 2
    for b in loader:
        lab = b.labels.view(2, 2)
        assert (lab[:, 0] == lab[:, 1]).all()


# ---- packing tools -----------------------------------------------------------------------------

def payload_multiset(root):
    layout = read_layout(root, use_cache=False)
    rec = IndexedRecordIO(layout.idx_path, layout.rec_path, "r")
    out = sorted((int(lab), hashlib.sha1(unpack(rec.read_idx(int(k)))[1]).hexdigest())
                 for k, lab in zip(layout.image_keys, layout.labels))
    rec.close()
    return out


def test_pack_folder_list_and_shuffle(tmp_path):
    src = image_folder(tmp_path / "src", [3, 1, 2], size=20)
    n, c = pack_folder(src, tmp_path / "a", workers=2, progress=False)
    assert (n, c) == (6, 3)
    assert (tmp_path / "a" / "property").read_text() == "3,20,20\n"
    layout = read_layout(tmp_path / "a")
    assert layout.kind == INSIGHTFACE and layout.labels.tolist() == [0, 0, 0, 1, 2, 2]
    ds = RecordDataset(tmp_path / "a", input_size=20, flip=False)
    with open(src / "person_02" / "1.png", "rb") as f:  # PNG re-encoded as JPEG: close, not equal
        ref = expected_tensor(f.read(), False)
    assert (ds[5][0] - ref).abs().mean() < 0.05
    # .lst (index, label, path), unsorted labels -> grouped
    lst = tmp_path / "src" / "train.lst"
    lst.write_text("0\t1\tperson_01/0.png\n1\t0\tperson_00/2.png\n2\t0\tperson_00/0.png\n")
    assert pack_list(lst, tmp_path / "b", resize=16, workers=1, progress=False) == (3, 2)
    assert read_layout(tmp_path / "b").labels.tolist() == [0, 0, 1]
    assert RecordDataset(tmp_path / "b", input_size=16)[0][0].shape == (3, 16, 16)
    # shuffle from both layouts: same (label, image) multiset, plain layout, keys 0..N-1
    shuffle_rec(tmp_path / "a", tmp_path / "s1", seed=1, progress=False)
    shuffle_rec(tmp_path / "s1", tmp_path / "s2", seed=2, progress=False)  # upstream #2254: plain input
    for out in ("s1", "s2"):
        lay = read_layout(tmp_path / out)
        assert lay.kind == PLAIN and lay.image_keys.tolist() == list(range(6))
        assert payload_multiset(tmp_path / out) == payload_multiset(tmp_path / "a")
    assert read_layout(tmp_path / "s1").labels.tolist() != [0, 0, 0, 1, 2, 2]
    with pytest.raises(DataError, match="overwrite"):
        shuffle_rec(tmp_path / "a", tmp_path / "a", progress=False)


def test_describe_and_dump(rec_dir, tmp_path):
    root, labels, payloads = rec_dir
    info = describe_rec(root, samples=3)
    assert info["num_images"] == 10 and info["num_identities"] == 4 and info["layout"] == INSIGHTFACE
    assert info["images_per_identity"]["max"] == 4 and info["images_per_identity"]["ids_with_1"] == 1
    assert len(info["samples"]) == 3 and info["samples"][0]["size"] == [16, 16]
    paths = dump_images(root, tmp_path / "dump", 2)
    assert len(paths) == 2 and open(paths[1], "rb").read() == payloads[1]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_tools(tmp_path, capsys):
    pack_rec, inspect_rec = load_tool("pack_rec"), load_tool("inspect_rec")
    src = image_folder(tmp_path / "src", [2, 2])
    assert pack_rec.main(["folder", str(src), str(tmp_path / "out"), "--workers", "1", "--quiet"]) == 0
    assert "num_classes=2, num_image=4" in capsys.readouterr().out
    os.remove(tmp_path / "out" / "train.idx")
    assert inspect_rec.main([str(tmp_path / "out")]) == 2
    assert "reindex" in capsys.readouterr().err
    assert pack_rec.main(["reindex", str(tmp_path / "out" / "train.rec")]) == 0
    assert read_index(tmp_path / "out" / "train.idx")[0].size == 7
    assert inspect_rec.main([str(tmp_path / "out"), "--dump", "2", "--out", str(tmp_path / "d")]) == 0
    assert "identities     2" in capsys.readouterr().out and len(os.listdir(tmp_path / "d")) == 2
    assert pack_rec.main(["shuffle", str(tmp_path / "out"), str(tmp_path / "shuf"), "--quiet"]) == 0
    assert read_layout(tmp_path / "shuf").kind == PLAIN


def test_cli_runs_as_a_script(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "inspect_rec.py"), str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "train.rec" in r.stderr
