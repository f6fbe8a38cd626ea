"""Which records of a .rec are images, and their labels, without reading millions of images.

Two layouts exist in the wild (docs: research host.md 2.4, 2.5):

* insightface (face2rec2, MS1M, Glint360K): key 0 is a header with flag > 0 and label
  [N_img + 1, N_img + 1 + N_ids]; keys 1..N_img are images grouped by identity; the keys after them are
  identity range records, label [first_key, end_key), no image.
* plain (im2rec, shuffled recs): every key is an image.

Labels come from the identity range records when they exist (a few hundred thousand tiny reads instead of
millions), else from the 24..28 header bytes of each image record (pread, no image bytes). Either way they
are cached in `<rec>.labels.npy`, keyed on what they were read from (label_cache.py): an edited .rec or .idx
is scanned again.

A run trains on upstream's labels, each image record's own header label (arcface_torch's MXFaceDataset never
reads the identity records): RecordDataset compares it with the layout's label whenever it reads a record and
refuses a record where they differ, so neither an inconsistent file nor a stale cache trains silently.
"""
import logging
import os
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import DataError
from .label_cache import UNREADABLE, content_key, label_cache_path, load_label_cache, save_label_cache
from .recordio import _HEAD, _IR_FORMAT, _IR_SIZE, _LEN_MASK, MAGIC, RecordIO, read_index, unpack

log = logging.getLogger(__name__)

INSIGHTFACE = "insightface"
PLAIN = "plain"

# bytes enough for the record head (8), the IRHeader (24) and the first float of an array label (4)
_PEEK = _HEAD.size + _IR_SIZE + 4
# identity-range labels are trusted after this many spot checks against the image headers agree
_SPOT_CHECKS = 64
# records whose first bytes key the label cache (with the .idx's hash and both files' sizes and mtimes)
LABEL_CACHE_PROBES = 256
# bad records named one by one in the log while a skip_bad_records scan leaves them out; the rest are counted
_NAMED_SKIPS = 5


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
    skipped: int = 0               # unreadable records left out by a skip_bad_records scan
    first_identity_key: Optional[int] = None  # insightface layout: the key of class 0's identity record

    def __len__(self):
        return int(self.image_keys.size)

    def label_origin(self, i):
        """Where image i's label came from and what to do, for the error that refuses a record whose header
        label disagrees with it."""
        label = int(self.labels[i])
        if self.label_source == "identity records":
            return (f"its identity record (key {self.first_identity_key + label}) gives label {label}: the file is "
                    "inconsistent and which label is right cannot be told; repack it, or set skip_bad_records=True "
                    "to leave such records out")
        if self.label_source == "cache":
            return (f"the label cache {label_cache_path(self.rec_path)} says label {label}: the cache is stale (the "
                    ".rec was edited keeping its size and times); delete it and restart")
        return f"the label scan at start-up read label {label} from it: the file changed since; restart"

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


def _integral(values):
    """Which float values are finite whole numbers that fit an int64 (a label, a key, a count)."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(values) & (np.abs(values) < 2.0 ** 62)
        return ok & (np.abs(values - np.rint(np.where(ok, values, 0))) <= 1e-3)


def _to_int_labels(values, keys, offsets, rec_path, skip_bad_records=False):
    """int64 labels of float header labels; a non-integer one is a DataError, or UNREADABLE when skipping."""
    values = np.asarray(values, dtype=np.float64)
    good = _integral(values)
    bad = np.flatnonzero(~good)
    if bad.size and not skip_bad_records:
        i = int(bad[0])
        raise DataError(_not_integer(rec_path, keys[i], offsets[i], values[i]))
    labels = np.rint(np.where(good, values, 0)).astype(np.int64)
    labels[bad] = UNREADABLE
    return labels


def _not_integer(rec_path, key, offset, value):
    return f"{rec_path} key {int(key)} at byte offset {int(offset)}: label {float(value):g} is not an integer class id"


def _labels_from_headers(reader, fd, keys, offsets, skip_bad_records=False):
    """Labels from every image record's header; with skip_bad_records a record whose header cannot be read, or
    whose label is not an integer, gets UNREADABLE (counted and logged) instead of stopping the scan."""
    values = np.empty(keys.size, dtype=np.float64)
    unreadable, named = np.zeros(keys.size, dtype=bool), []
    for i, (key, offset) in enumerate(zip(keys.tolist(), offsets.tolist())):
        try:
            values[i] = _header(reader, fd, offset, key)[1]
        except DataError as exc:
            if not skip_bad_records:
                raise
            values[i], unreadable[i] = np.nan, True
            if len(named) < _NAMED_SKIPS:
                named.append(str(exc))
    labels = _to_int_labels(values, keys, offsets, reader.uri, skip_bad_records)
    bad = labels == UNREADABLE
    for i in np.flatnonzero(bad & ~unreadable)[:max(0, _NAMED_SKIPS - len(named))].tolist():
        named.append(_not_integer(reader.uri, keys[i], offsets[i], values[i]))
    _log_skipped(reader.uri, int(bad.sum()), keys.size, named)
    return labels


def _log_skipped(rec_path, count, total, named):
    if not count:
        return
    for text in named:
        log.warning("skipping bad record (skip_bad_records=True): %s", text)
    more = f" ({count - len(named)} more not shown)" if count > len(named) else ""
    log.warning("%s: %d of %d image records cannot be read and are left out (skip_bad_records=True)%s",
                rec_path, count, total, more)


def _labels_from_identities(reader, fd, offset_of, n_img, id_end):
    """Labels for image keys 1..n_img from the identity records n_img+1 .. id_end-1, or None if they cannot be
    read or do not tile the image keys exactly (then the caller reads the image headers, the labels upstream
    trains on)."""
    id_keys = np.arange(n_img + 1, id_end, dtype=np.int64)
    id_offsets = offset_of(id_keys)
    if id_keys.size == 0 or id_offsets is None:
        return None
    bounds = np.empty((id_keys.size, 2), dtype=np.float64)
    for i, (key, offset) in enumerate(zip(id_keys.tolist(), id_offsets.tolist())):
        try:
            header, _ = unpack_record(reader.read_at(offset, key), reader.uri, key, offset)
        except DataError as exc:
            log.warning("%s: identity record unreadable (%s); reading the image headers instead", reader.uri, exc)
            return None
        if header.flag < 2:
            return None
        bounds[i] = header.label[:2]
    bad = np.flatnonzero(~_integral(bounds).all(axis=1))
    if bad.size:
        i = int(bad[0])
        log.warning("%s: identity record key %d holds the range %s, not two integer keys; reading the image "
                    "headers instead", reader.uri, int(id_keys[i]), bounds[i].tolist())
        return None
    bounds = np.rint(bounds).astype(np.int64)
    starts, ends = bounds[:, 0], bounds[:, 1]
    counts = ends - starts
    if starts[0] != 1 or ends[-1] != n_img + 1 or (counts <= 0).any() or (starts[1:] != ends[:-1]).any():
        return None
    labels = np.repeat(np.arange(id_keys.size, dtype=np.int64), counts)
    # spot-check: the identity record order must be the class id, as face2rec2 writes it
    probe = np.unique(np.concatenate([starts, ends - 1])[:: max(1, (2 * starts.size) // _SPOT_CHECKS)])
    for key, offset in zip(probe.tolist(), offset_of(probe).tolist()):
        try:
            _, value = _header(reader, fd, offset, key)
        except DataError:
            return None  # the header scan names it (or skips it)
        if float(value) != float(np.float32(labels[key - 1])):  # at the header's float32 precision; NaN never equals
            log.warning("%s: key %d's header says label %g but the identity records give %d; reading every image "
                        "header instead (the labels upstream trains on)", reader.uri, key, value, labels[key - 1])
            return None
    return labels


def _image_range(header, rec_path, n_keys):
    """(n_img, id_end) from the header record (key 0) of an insightface file, checked before they size arrays."""
    values = np.asarray(header.label, dtype=np.float64).ravel()[:2]
    shown = header.label.tolist()
    if not _integral(values).all():
        raise DataError(f"{rec_path} key 0: header label {shown} is not [first identity key, end key] as whole "
                        "numbers (a corrupt header record)")
    n_img = int(round(values[0])) - 1
    id_end = int(round(values[1])) if header.flag > 1 else None
    if n_img < 0:
        raise DataError(f"{rec_path} key 0: header label {shown} announces a negative image count")
    if n_img >= n_keys:
        raise DataError(f"{rec_path} key 0: header label {shown} announces {n_img} images but the index lists "
                        f"{n_keys} records (a corrupt header record, or the .idx of another file)")
    if id_end is not None and not n_img + 1 <= id_end <= n_img + 1 + n_keys:
        raise DataError(f"{rec_path} key 0: header label {shown} announces identity keys {n_img + 1}..{id_end - 1}, "
                        f"impossible for an index of {n_keys} records")
    return n_img, id_end


def read_layout(root, num_classes: Optional[int] = None, use_cache: bool = True,
                skip_bad_records: bool = False) -> RecordLayout:
    """The RecordLayout of a dataset folder (train.rec/train.idx) or of a .rec path.

    skip_bad_records: image records whose header cannot be read while the labels are scanned are left out of
    the layout and counted in `skipped` (as RecordDataset skips the records it cannot decode) instead of
    stopping with an error.
    """
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
                n_img, id_end = _image_range(header, rec_path, keys.size)
                wanted = np.arange(1, n_img + 1, dtype=np.int64)
                pos = np.minimum(np.searchsorted(sorted_keys, wanted), keys.size - 1)
                found = sorted_keys[pos] == wanted
                if not found.all():
                    missing = int(wanted[np.flatnonzero(~found)[0]])
                    raise DataError(f"{rec_path}: header (key 0) announces image keys 1..{n_img} but key "
                                    f"{missing} is not in {idx_path}")
                kind, image_sel = INSIGHTFACE, np.sort(order[pos])
        image_keys, image_offsets = keys[image_sel], offsets[image_sel]

        labels, source, key = None, "", None
        if use_cache:
            key = content_key(rec_path, idx_path, offsets, LABEL_CACHE_PROBES, _PEEK)
            labels = load_label_cache(rec_path, key, image_keys.size)
            if labels is not None and (labels == UNREADABLE).any() and not skip_bad_records:
                labels = None  # scan again, so the unreadable record is named
            source = "cache" if labels is not None else ""
        if labels is None and kind == INSIGHTFACE and id_end is not None and id_end > n_img + 1:
            labels = _labels_from_identities(reader, fd, offset_of, n_img, id_end)
            if labels is not None:
                # identity order is the image key order; map to the .idx order of image_keys
                labels = labels[image_keys - 1]
                source = "identity records"
        if labels is None:
            labels = _labels_from_headers(reader, fd, image_keys, image_offsets, skip_bad_records)
            source = "record headers"
        if use_cache and source != "cache":
            save_label_cache(rec_path, key, labels)
    finally:
        os.close(fd)
        reader.close()

    readable = labels != UNREADABLE
    skipped = int((~readable).sum())
    if source == "cache" and skipped:
        log.warning("%s: %d unreadable image records are left out (skip_bad_records=True; from the label cache)",
                    rec_path, skipped)
    layout = RecordLayout(rec_path, idx_path, kind, image_keys[readable].astype(np.int64),
                          image_offsets[readable].astype(np.int64), labels[readable].astype(np.int64), source,
                          skipped, n_img + 1 if kind == INSIGHTFACE else None)
    layout.check_num_classes(num_classes)
    return layout
