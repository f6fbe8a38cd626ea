"""Which records of a .rec are images, and their labels, without reading millions of images.

Two layouts exist in the wild (docs: research host.md 2.4, 2.5):

* insightface (face2rec2, MS1M, Glint360K): key 0 is a header with flag > 0 and label
  [N_img + 1, N_img + 1 + N_ids]; keys 1..N_img are images grouped by identity; the keys after them are
  identity range records, label [first_key, end_key), no image.
* plain (im2rec, shuffled recs): every key is an image.

Labels come from the identity range records when they exist (a few hundred thousand tiny reads instead of
millions), else from the 24..28 header bytes of each image record (pread, no image bytes). Either way they
are cached in `<rec>.labels.npy`, valid while the .idx keeps its size and mtime.
"""
import logging
import os
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import DataError
from .recordio import _HEAD, _IR_FORMAT, _IR_SIZE, _LEN_MASK, MAGIC, RecordIO, read_index, unpack

log = logging.getLogger(__name__)

INSIGHTFACE = "insightface"
PLAIN = "plain"

# <rec>.labels.npy: int64 [CACHE_TAG, idx size, idx mtime_ns, N, label_0 .. label_{N-1}]
CACHE_TAG = 0x4C41424C53763031  # "LABLSv01"
_CACHE_HEAD = 4
# bytes enough for the record head (8), the IRHeader (24) and the first float of an array label (4)
_PEEK = _HEAD.size + _IR_SIZE + 4
# identity-range labels are trusted after this many spot checks against the image headers agree
_SPOT_CHECKS = 64


@dataclass
class RecordLayout:
    """The image records of one .rec/.idx pair."""
    rec_path: str
    idx_path: str
    kind: str                      # INSIGHTFACE or PLAIN
    image_keys: np.ndarray         # int64 [N] record keys of the images, in .idx order
    offsets: np.ndarray            # int64 [N] byte offsets of those records in the .rec
    labels: np.ndarray             # int64 [N] identity labels (label[0] for array labels)
    label_source: str = ""         # "identity records", "record headers" or "cache"

    def __len__(self):
        return int(self.image_keys.size)

    @property
    def num_classes(self):
        """Number of distinct labels in the data (not the configured num_classes)."""
        return int(np.unique(self.labels).size) if self.labels.size else 0

    def check_num_classes(self, num_classes):
        """DataError naming the first record whose label falls outside [0, num_classes); with None, only
        negative labels are refused."""
        if self.labels.size == 0:
            return
        upper = np.iinfo(np.int64).max if num_classes is None else int(num_classes)
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= upper))
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{self.rec_path} key {int(self.image_keys[i])} at byte offset {int(self.offsets[i])}: label "
                f"{int(self.labels[i])} outside [0, num_classes={num_classes}) ({bad.size} records in all); "
                f"set num_classes to at least {int(self.labels.max()) + 1} or fix the data (a label outside "
                f"the range gives upstream's constant loss 69.0776)")


def rec_paths(root):
    """(rec, idx) for a dataset folder holding train.rec/train.idx, or for a path to a .rec file."""
    root = str(root)
    if root.endswith(".rec"):
        return root, root[:-4] + ".idx"
    return os.path.join(root, "train.rec"), os.path.join(root, "train.idx")


def _peek_header(fd, offset, rec_path, key):
    """(flag, first label) of the record at `offset`, from its first bytes only."""
    head = os.pread(fd, _PEEK, int(offset))
    if len(head) < _HEAD.size + _IR_SIZE:
        raise DataError(f"{rec_path} key {key} at byte offset {offset}: truncated record (file ends early)")
    magic, lrec = _HEAD.unpack_from(head)
    if magic != MAGIC:
        raise DataError(f"{rec_path} key {key} at byte offset {offset}: wrong magic 0x{magic:08X}, expected "
                        f"0x{MAGIC:08X} (corrupt file, or the .idx does not belong to this .rec)")
    length = lrec & _LEN_MASK
    flag, label, _, _ = struct.unpack_from(_IR_FORMAT, head, _HEAD.size)
    first_part_short = (lrec >> 29) != 0 and length < _IR_SIZE + 4 * (flag > 0)
    if length < _IR_SIZE or first_part_short:
        return None  # split inside the IRHeader or too short: the caller reads the whole record
    if flag > 0:
        if len(head) < _PEEK or length < _IR_SIZE + 4:
            raise DataError(f"{rec_path} key {key} at byte offset {offset}: header announces {flag} float "
                            "labels but the record is too short")
        label = struct.unpack_from("<f", head, _HEAD.size + _IR_SIZE)[0]
    return flag, label


def _header(reader, fd, offset, key):
    peeked = _peek_header(fd, offset, reader.uri, key)
    if peeked is not None:
        return peeked
    header, _ = unpack_record(reader.read_at(offset, key), reader.uri, key, offset)
    label = header.label[0] if header.flag > 0 else header.label
    return header.flag, label


def unpack_record(buf, rec_path, key, offset):
    """recordio.unpack with the file, key and offset in the error."""
    try:
        return unpack(buf)
    except DataError as exc:
        raise DataError(f"{rec_path} key {key} at byte offset {offset}: {exc}") from None


def _to_int_labels(values, keys, offsets, rec_path):
    values = np.asarray(values, dtype=np.float64)
    labels = np.rint(values).astype(np.int64)
    bad = np.flatnonzero(~np.isfinite(values) | (np.abs(values - labels) > 1e-3))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{rec_path} key {int(keys[i])} at byte offset {int(offsets[i])}: label {float(values[i]):g} "
                        "is not an integer class id")
    return labels


def _labels_from_headers(reader, fd, keys, offsets):
    values = np.empty(keys.size, dtype=np.float64)
    for i, (key, offset) in enumerate(zip(keys.tolist(), offsets.tolist())):
        values[i] = _header(reader, fd, offset, key)[1]
    return _to_int_labels(values, keys, offsets, reader.uri)


def _labels_from_identities(reader, fd, offset_of, n_img, id_end):
    """Labels for image keys 1..n_img from the identity records n_img+1 .. id_end-1, or None if they do not
    tile the image keys exactly (then the caller reads the image headers)."""
    id_keys = np.arange(n_img + 1, id_end, dtype=np.int64)
    id_offsets = offset_of(id_keys)
    if id_keys.size == 0 or id_offsets is None:
        return None
    bounds = np.empty((id_keys.size, 2), dtype=np.int64)
    for i, (key, offset) in enumerate(zip(id_keys.tolist(), id_offsets.tolist())):
        header, _ = unpack_record(reader.read_at(offset, key), reader.uri, key, offset)
        if header.flag < 2:
            return None
        bounds[i] = header.label[:2]
    starts, ends = bounds[:, 0], bounds[:, 1]
    counts = ends - starts
    if starts[0] != 1 or ends[-1] != n_img + 1 or (counts <= 0).any() or (starts[1:] != ends[:-1]).any():
        return None
    labels = np.repeat(np.arange(id_keys.size, dtype=np.int64), counts)
    # spot-check: the identity record order must be the class id, as face2rec2 writes it
    probe = np.unique(np.concatenate([starts, ends - 1])[:: max(1, (2 * starts.size) // _SPOT_CHECKS)])
    for key, offset in zip(probe.tolist(), offset_of(probe).tolist()):
        _, value = _header(reader, fd, offset, key)
        if int(round(value)) != labels[key - 1]:
            log.info("%s: identity records do not match image labels at key %d; reading image headers",
                     reader.uri, key)
            return None
    return labels


def _cache_path(rec_path):
    return rec_path + ".labels.npy"


def _idx_stamp(idx_path):
    st = os.stat(idx_path)
    return int(st.st_size), int(st.st_mtime_ns)


def _load_cache(rec_path, idx_path, n):
    path = _cache_path(rec_path)
    if not os.path.isfile(path):
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    size, mtime = _idx_stamp(idx_path)
    if (arr.ndim != 1 or arr.dtype != np.int64 or arr.size < _CACHE_HEAD or arr[0] != CACHE_TAG
            or arr[1] != size or arr[2] != mtime or arr[3] != n or arr.size != _CACHE_HEAD + n):
        return None
    return arr[_CACHE_HEAD:].copy()


def _save_cache(rec_path, idx_path, labels):
    path = _cache_path(rec_path)
    size, mtime = _idx_stamp(idx_path)
    arr = np.concatenate([np.array([CACHE_TAG, size, mtime, labels.size], dtype=np.int64), labels])
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only dataset folder is fine, only slower next time
        log.warning("could not write the label cache %s (%s); labels will be re-read next time", path, exc)
        try:
            os.remove(tmp)
        except OSError:
            pass


def read_layout(root, num_classes: Optional[int] = None, use_cache: bool = True) -> RecordLayout:
    """The RecordLayout of a dataset folder (train.rec/train.idx) or of a .rec path."""
    rec_path, idx_path = rec_paths(root)
    if not os.path.isfile(rec_path):
        raise DataError(f"record file not found: {rec_path} (expected a dataset folder with train.rec and "
                        "train.idx, as written by tools/pack_rec.py or insightface's face2rec2)")
    keys, offsets = read_index(idx_path)
    if keys.size == 0:
        raise DataError(f"{idx_path} lists no records")
    rec_size = os.path.getsize(rec_path)
    past = np.flatnonzero(offsets >= rec_size)
    if past.size:
        i = int(past[0])
        raise DataError(f"{idx_path}: key {int(keys[i])} points to byte {int(offsets[i])}, past the end of "
                        f"{rec_path} ({rec_size} bytes); the index belongs to another or a truncated file")
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]

    def offset_of(wanted):
        """Offsets of these keys (vectorised lookup), or None if any is missing."""
        pos = np.minimum(np.searchsorted(sorted_keys, wanted), keys.size - 1)
        return offsets[order[pos]] if (sorted_keys[pos] == wanted).all() else None

    reader = RecordIO(rec_path, "r")
    fd = os.open(rec_path, os.O_RDONLY)
    try:
        first = int(np.flatnonzero(keys == 0)[0]) if (keys == 0).any() else None
        kind, image_sel, n_img, id_end = PLAIN, np.arange(keys.size), None, None
        if first is not None:
            header, payload = unpack_record(reader.read_at(offsets[first], 0), rec_path, 0, int(offsets[first]))
            if header.flag > 0 and len(payload) == 0:  # an image with an array label is not a header
                n_img = int(round(float(header.label[0]))) - 1
                id_end = int(round(float(header.label[1]))) if header.flag > 1 else None
                if n_img < 0:
                    raise DataError(f"{rec_path} key 0: header label {header.label.tolist()} announces a "
                                    "negative image count")
                wanted = np.arange(1, n_img + 1, dtype=np.int64)
                pos = np.searchsorted(keys[order], wanted)
                pos = np.minimum(pos, keys.size - 1)
                found = keys[order][pos] == wanted
                if not found.all():
                    missing = int(wanted[np.flatnonzero(~found)[0]])
                    raise DataError(f"{rec_path}: header (key 0) announces image keys 1..{n_img} but key "
                                    f"{missing} is not in {idx_path}")
                kind, image_sel = INSIGHTFACE, np.sort(order[pos])
        image_keys, image_offsets = keys[image_sel], offsets[image_sel]

        labels, source = None, ""
        if use_cache:
            labels = _load_cache(rec_path, idx_path, image_keys.size)
            source = "cache" if labels is not None else ""
        if labels is None and kind == INSIGHTFACE and id_end is not None and id_end > n_img + 1:
            labels = _labels_from_identities(reader, fd, offset_of, n_img, id_end)
            if labels is not None:
                # identity order is the image key order; map to the .idx order of image_keys
                labels = labels[image_keys - 1]
                source = "identity records"
        if labels is None:
            labels = _labels_from_headers(reader, fd, image_keys, image_offsets)
            source = "record headers"
        if use_cache and source != "cache":
            _save_cache(rec_path, idx_path, labels)
    finally:
        os.close(fd)
        reader.close()

    layout = RecordLayout(rec_path, idx_path, kind, image_keys.astype(np.int64), image_offsets.astype(np.int64),
                          labels.astype(np.int64), source)
    layout.check_num_classes(num_classes)
    return layout
