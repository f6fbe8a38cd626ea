"""`<rec>.labels.npy`: the labels of a .rec's image records, so a start-up need not scan them again.

Keyed on what the labels were read from, not only on the .idx's size and mtime (which an edited .rec keeps):
the sha256 of the .idx, the sizes and mtimes of both files, and the first bytes (frame head, IRHeader, first
array label) of LABEL_CACHE_PROBES records spread over the file. That costs one hash of the .idx and a few
hundred small reads, never a pass over the .rec. An edit that keeps sizes and times and misses every probe
still cannot train silently: RecordDataset compares each record's header label with the cached one.

File: int64 [TAG, N, idx size, idx mtime_ns, rec size, rec mtime_ns, digest (4 words), label_0 .. label_{N-1}];
a label of UNREADABLE marks a record a skip_bad_records scan could not read.
"""
import hashlib
import logging
import os

import numpy as np

log = logging.getLogger(__name__)

TAG = 0x4C41424C53763032  # "LABLSv02"; v01 files (keyed on the .idx's size and mtime) are scanned again
_HEAD = 10
# int64 min: no float32 header label rounds to it and passes the integer check, so it cannot be a real label
UNREADABLE = np.iinfo(np.int64).min


def label_cache_path(rec_path):
    return str(rec_path) + ".labels.npy"


def content_key(rec_path, idx_path, offsets, probes, peek):
    """int64 [8]: sizes and mtimes of both files and a digest of the .idx and of the probed record heads."""
    digest = hashlib.sha256()
    with open(idx_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    rec, idx = os.stat(rec_path), os.stat(idx_path)
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.size:
        spots = np.unique(np.linspace(0, offsets.size - 1, max(2, int(probes))).round().astype(np.int64))
        fd = os.open(rec_path, os.O_RDONLY)
        try:
            for offset in offsets[spots].tolist():
                digest.update(os.pread(fd, peek, offset))
        finally:
            os.close(fd)
    words = np.frombuffer(digest.digest(), dtype="<i8").astype(np.int64)
    return np.concatenate([np.array([idx.st_size, idx.st_mtime_ns, rec.st_size, rec.st_mtime_ns], dtype=np.int64),
                           words])


def load_label_cache(rec_path, key, n):
    """The cached int64 [n] labels, or None when there is no cache or it was written for other content."""
    path = label_cache_path(rec_path)
    if not os.path.isfile(path):
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if (arr.ndim != 1 or arr.dtype != np.int64 or arr.size != _HEAD + n or arr[0] != TAG or arr[1] != n
            or not np.array_equal(arr[2:_HEAD], key)):
        return None
    return arr[_HEAD:].copy()


def save_label_cache(rec_path, key, labels):
    """Written to a temp file and renamed; a read-only dataset folder only costs a scan next time."""
    path = label_cache_path(rec_path)
    arr = np.concatenate([np.array([TAG, labels.size], dtype=np.int64), key, labels.astype(np.int64)])
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write the label cache %s (%s); labels will be re-read next time", path, exc)
        try:
            os.remove(tmp)
        except OSError:
            pass
