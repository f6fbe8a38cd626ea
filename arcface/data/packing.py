"""Writing and inspecting training .rec files (the logic behind tools/pack_rec.py and tools/inspect_rec.py).

Two outputs:
* insightface layout (`write_insightface_rec`): header key 0, images 1..N grouped by identity, identity
  range records after them, plus the `property` file - what MS1M/Glint360K downloads look like, and what
  the PyTorch loader reads fastest (labels come from the identity records).
* plain shuffled layout (`shuffle_rec`): image records only, keys 0..N-1 in random order, scalar labels -
  what DALI's reader needs (its shuffle buffer is small). Works from either layout (upstream's
  scripts/shuffle_rec.py only from the insightface one, issue #2254).
Files are written under temporary names and renamed when complete.
"""
import io
import json
import multiprocessing
import os

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import DataError
from .datasets import decode_image, scan_image_folder
from .layout import INSIGHTFACE, read_layout, rec_paths, unpack_record
from .recordio import IRHeader, RecordIO, pack, reindex

JPEG_SOI = b"\xff\xd8\xff"


def encode_image(path, resize=None, quality=95, reencode=False):
    """JPEG bytes of an image file: the file's own bytes when it already is a JPEG and nothing changes,
    else decoded, converted to RGB, optionally resized to resize x resize, and encoded."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(JPEG_SOI) and not resize and not reencode:
        return data
    img = decode_image(data, path)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if resize and img.size != (resize, resize):
        img = img.resize((resize, resize), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _encode_job(args):
    return encode_image(*args)


class RecWriter:
    """Streaming .rec/.idx writer under temporary names; `commit()` renames both into place.

    Unlike IndexedRecordIO('w') it keeps no in-memory index, so packing 42M images needs no GBs of dict.
    """

    def __init__(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        self.rec_path, self.idx_path = rec_paths(out_dir)
        self._rec = RecordIO(self.rec_path + ".tmp", "w")
        self._idx = open(self.idx_path + ".tmp", "w")

    def write(self, key, buf):
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        self._rec.write(buf)

    def commit(self):
        self._rec.close()
        self._idx.close()
        os.replace(self.idx_path + ".tmp", self.idx_path)
        os.replace(self.rec_path + ".tmp", self.rec_path)

    def abort(self):
        self._rec.close()
        self._idx.close()
        for p in (self.rec_path + ".tmp", self.idx_path + ".tmp"):
            if os.path.exists(p):
                os.remove(p)


def write_insightface_rec(out_dir, labels, payloads, image_size=(112, 112), progress=False):
    """Write train.rec/train.idx/property in insightface layout.

    labels: int class ids 0..C-1, non-decreasing (images grouped by identity), one per payload;
    payloads: iterable of encoded images (may be a lazy generator). Returns (num_images, num_classes).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = int(labels.size)
    if n == 0:
        raise DataError(f"{out_dir}: nothing to pack (no images)")
    if (np.diff(labels) < 0).any():
        raise DataError("write_insightface_rec: labels must be grouped by identity (non-decreasing)")
    ids, starts, counts = np.unique(labels, return_index=True, return_counts=True)
    if ids[0] != 0 or ids[-1] != ids.size - 1:
        missing = sorted(set(range(int(ids[-1]) + 1)) - set(ids.tolist()))[:5]
        raise DataError(f"labels must be the contiguous class ids 0..C-1; got {ids.size} ids in "
                        f"[{ids[0]}, {ids[-1]}], missing e.g. {missing}")
    writer = RecWriter(out_dir)
    try:
        writer.write(0, pack(IRHeader(0, [n + 1, n + 1 + ids.size], 0, 0), b""))
        written = 0
        for key, payload in enumerate(tqdm(payloads, total=n, disable=not progress, desc="pack"), start=1):
            if key > n:
                raise DataError(f"more payloads than the {n} labels given")
            writer.write(key, pack(IRHeader(0, float(labels[key - 1]), key, 0), payload))
            written = key
        if written != n:
            raise DataError(f"{written} payloads for {n} labels")
        for i in range(ids.size):
            first = 1 + int(starts[i])
            key = n + 1 + i
            writer.write(key, pack(IRHeader(0, [first, first + int(counts[i])], key, 0), b""))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    write_property(out_dir, ids.size, image_size)
    return n, int(ids.size)


def write_property(out_dir, num_classes, image_size):
    path = os.path.join(out_dir, "property")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{num_classes},{image_size[0]},{image_size[1]}\n")
    os.replace(tmp, path)


def _encoded(paths, resize, quality, reencode, workers):
    jobs = [(p, resize, quality, reencode) for p in paths]
    if workers <= 1:
        for job in jobs:
            yield _encode_job(job)
        return
    with multiprocessing.get_context("spawn" if os.name == "nt" else "fork").Pool(workers) as pool:
        yield from pool.imap(_encode_job, jobs, chunksize=32)


def _first_size(path, resize):
    if resize:
        return (resize, resize)
    with Image.open(path) as img:
        return (img.size[1], img.size[0])


def pack_folder(src, out_dir, resize=None, quality=95, reencode=False, workers=None, progress=True):
    """Image folder (one sub-folder per identity, sorted names -> labels 0..C-1) -> insightface-layout rec.
    Also writes identities.txt (label -> folder name). Returns (num_images, num_classes)."""
    paths, labels, classes = scan_image_folder(src)
    workers = workers if workers is not None else max(1, (os.cpu_count() or 1))
    size = _first_size(paths[0], resize)
    result = write_insightface_rec(out_dir, labels, _encoded(paths, resize, quality, reencode, workers),
                                   size, progress)
    _write_text(os.path.join(out_dir, "identities.txt"), "".join(f"{i}\t{c}\n" for i, c in enumerate(classes)))
    return result


def read_list(lst_path, root=None):
    """(paths, int64 labels) of an im2rec .lst file: `index \\t label [\\t more labels] \\t path` per line;
    relative paths are taken from `root` (default: the .lst's folder). The first label is the class."""
    if not os.path.isfile(lst_path):
        raise DataError(f"list file not found: {lst_path}")
    root = root if root is not None else os.path.dirname(os.path.abspath(lst_path))
    paths, labels = [], []
    with open(lst_path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 3:
                raise DataError(f"{lst_path} line {lineno}: expected 'index<TAB>label<TAB>path', got {line[:80]!r}")
            try:
                label = float(fields[1])
            except ValueError:
                raise DataError(f"{lst_path} line {lineno}: label {fields[1]!r} is not a number") from None
            if label != int(label) or label < 0:
                raise DataError(f"{lst_path} line {lineno}: label {fields[1]!r} is not a class id >= 0")
            labels.append(int(label))
            paths.append(os.path.join(root, fields[-1]))
    if not paths:
        raise DataError(f"{lst_path}: no entries")
    return paths, np.asarray(labels, dtype=np.int64)


def pack_list(lst_path, out_dir, root=None, resize=None, quality=95, reencode=False, workers=None,
              progress=True):
    """.lst (im2rec format) -> insightface-layout rec, images grouped by label (stable within a label)."""
    paths, labels = read_list(lst_path, root)
    order = np.argsort(labels, kind="stable")
    paths = [paths[i] for i in order]
    labels = labels[order]
    missing = next((p for p in paths if not os.path.isfile(p)), None)
    if missing:
        raise DataError(f"{lst_path}: listed image not found: {missing}")
    workers = workers if workers is not None else max(1, (os.cpu_count() or 1))
    size = _first_size(paths[0], resize)
    return write_insightface_rec(out_dir, labels, _encoded(paths, resize, quality, reencode, workers),
                                 size, progress)


def shuffle_rec(src, out_dir, seed=0, progress=True):
    """Any layout -> plain shuffled rec (image records only, keys 0..N-1, scalar labels) for DALI.
    Returns the number of images."""
    layout = read_layout(src)
    rec_path, idx_path = rec_paths(out_dir)
    if os.path.abspath(rec_path) == os.path.abspath(layout.rec_path):
        raise DataError(f"shuffle_rec: output {rec_path} would overwrite the input; choose another folder")
    perm = np.random.default_rng(seed).permutation(len(layout))
    reader = RecordIO(layout.rec_path, "r")
    writer = RecWriter(out_dir)
    try:
        for new_key, i in enumerate(tqdm(perm.tolist(), disable=not progress, desc="shuffle")):
            key, offset = int(layout.image_keys[i]), int(layout.offsets[i])
            _, payload = unpack_record(reader.read_at(offset, key), layout.rec_path, key, offset)
            writer.write(new_key, pack(IRHeader(0, float(layout.labels[i]), new_key, 0), payload))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()
    src_dir = os.path.dirname(layout.rec_path)
    for name in ("property", "identities.txt"):
        if os.path.isfile(os.path.join(src_dir, name)):
            with open(os.path.join(src_dir, name)) as f:
                _write_text(os.path.join(out_dir, name), f.read())
    return len(layout)


def reindex_rec(rec_path, idx_path=None):
    """Rebuild a lost .idx from the .rec. Returns (idx_path, number of records)."""
    return reindex(rec_path, idx_path)


def describe_rec(root, samples=5):
    """A summary of a dataset folder: layout, counts, images-per-identity statistics, a few samples."""
    layout = read_layout(root)
    _, counts = np.unique(layout.labels, return_counts=True)
    info = {
        "rec": layout.rec_path,
        "layout": layout.kind,
        "label_source": layout.label_source,
        "num_images": len(layout),
        "num_identities": int(counts.size),
        "label_min": int(layout.labels.min()),
        "label_max": int(layout.labels.max()),
        "images_per_identity": {
            "min": int(counts.min()), "median": float(np.median(counts)), "mean": float(counts.mean()),
            "max": int(counts.max()), "ids_with_1": int((counts == 1).sum()), "ids_below_4": int((counts < 4).sum()),
        },
        "samples": [],
    }
    prop = os.path.join(os.path.dirname(layout.rec_path), "property")
    if layout.kind == INSIGHTFACE and os.path.isfile(prop):
        with open(prop) as f:
            info["property"] = f.read().strip()
    reader = RecordIO(layout.rec_path, "r")
    try:
        for i in np.linspace(0, len(layout) - 1, num=min(samples, len(layout))).astype(int).tolist():
            key, offset = int(layout.image_keys[i]), int(layout.offsets[i])
            header, payload = unpack_record(reader.read_at(offset, key), layout.rec_path, key, offset)
            img = decode_image(payload, f"{layout.rec_path} key {key} at byte offset {offset}")
            info["samples"].append({"index": i, "key": key, "offset": offset, "label": int(layout.labels[i]),
                                    "flag": int(header.flag), "bytes": len(payload), "format": img.format,
                                    "size": list(img.size), "mode": img.mode})
    finally:
        reader.close()
    return info


def dump_images(root, out_dir, count):
    """Write the first `count` images as <index>_label<label>_key<key>.<ext>; returns the paths."""
    layout = read_layout(root)
    os.makedirs(out_dir, exist_ok=True)
    reader = RecordIO(layout.rec_path, "r")
    written = []
    try:
        for i in range(min(count, len(layout))):
            key, offset = int(layout.image_keys[i]), int(layout.offsets[i])
            _, payload = unpack_record(reader.read_at(offset, key), layout.rec_path, key, offset)
            img = decode_image(payload, f"{layout.rec_path} key {key} at byte offset {offset}")
            ext = {"JPEG": "jpg", "PNG": "png"}.get(img.format, "png")
            path = os.path.join(out_dir, f"{i:06d}_label{int(layout.labels[i])}_key{key}.{ext}")
            if ext == "png" and img.format != "PNG":
                img.save(path)
            else:
                with open(path, "wb") as f:
                    f.write(payload)
            written.append(path)
    finally:
        reader.close()
    return written


def _write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def format_description(info):
    """Human-readable lines for describe_rec's dict."""
    ipi = info["images_per_identity"]
    lines = [
        f"rec            {info['rec']}",
        f"layout         {info['layout']} (labels from {info['label_source']})",
        f"images         {info['num_images']}",
        f"identities     {info['num_identities']} (labels {info['label_min']}..{info['label_max']})",
        f"imgs/identity  min {ipi['min']}  median {ipi['median']:g}  mean {ipi['mean']:.2f}  max {ipi['max']}  "
        f"(1 image: {ipi['ids_with_1']} ids, < 4: {ipi['ids_below_4']} ids)",
    ]
    if "property" in info:
        lines.append(f"property       {info['property']}")
    for s in info["samples"]:
        lines.append(f"  index {s['index']:>8}  key {s['key']:>8}  label {s['label']:>7}  {s['format']} "
                     f"{s['size'][0]}x{s['size'][1]} {s['mode']}  {s['bytes']} bytes @ {s['offset']}")
    return lines


def to_json(info):
    return json.dumps(info, indent=1)
