"""The teacher embedding cache file: the teacher run once over the training .rec, kept as ONE memory-mapped array.

Peers that wrote one file per sample found it slower than recomputing (research anchors.md 6.6); here every
embedding lives in one contiguous array, read back by numpy fancy indexing on a memory map, so a lookup costs
a few page reads and no file opens.

File layout (little-endian):

    [0, 8)                 magic: MAGIC_PARTIAL while being built, MAGIC_COMPLETE once every chunk is written
    [8, 16)                uint64: byte length of the JSON header
    [16, 16 + length)      the header, JSON with sorted keys (teacher, preprocessing, dataset, arrays, build)
    ... zeros up to HEADER_BYTES
    embeddings             float16 [N, 2, d]: L2-normalised teacher embeddings; [:, 0] the image as stored,
                           [:, 1] horizontally flipped; row i is the dataset's sample index i
    norms                  float32 [N, 2]: L2 norms of the raw embeddings (NaN: the record was unreadable)

Why the norms too: the losses that compare raw embeddings (l2; iled with distance 'mse' / 'l2sq') would see
unit vectors from a cache and raw vectors from a live teacher. norm * unit gives back the raw embedding to
fp16 precision for 4 bytes per view (0.4% of a 512-d row), so every loss behaves as with the live teacher.

Building it (chunked, resumable, on several ranks) is build.py; reading it during training is
teacher_backends/cache_backend.py.
"""
import glob
import hashlib
import json
import math
import os
import struct

import numpy as np
import torch

from arcface.data.layout import read_layout, rec_paths
from arcface.data.recordio import read_index
from arcface.errors import ConfigError, DataError

FORMAT = "ukd-teacher-cache"
FORMAT_VERSION = 1
MAGIC_PARTIAL = b"UKDTC\x00P1"
MAGIC_COMPLETE = b"UKDTC\x00C1"
HEADER_BYTES = 16384
NORMALISATION = "(pixel - 127.5) / 127.5, RGB, NCHW float32; PIL bilinear resize to input_size when stored " \
                "at another size"
VIEWS = ["as stored", "horizontally flipped"]


# ---- identities --------------------------------------------------------------------------------------------

def file_sha256(path, block=1 << 22):
    """Hex sha256 of a file (teacher checkpoints, the .idx)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for part in iter(lambda: f.read(block), b""):
                digest.update(part)
    except OSError as exc:
        raise ConfigError(f"cannot read {path} to hash it: {exc}") from None
    return digest.hexdigest()


def dataset_identity(rec, what="the teacher cache needs cfg.rec to be"):
    """{rec, idx, images, records, idx_sha256} of a RecordIO training set."""
    if rec is None or str(rec) == "synthetic":
        raise ConfigError(f"{what} a RecordIO folder (train.rec/train.idx), got rec={rec!r}")
    rec_file, idx_file = rec_paths(rec)
    if not (os.path.isfile(rec_file) and os.path.isfile(idx_file)):
        raise ConfigError(f"{what} a RecordIO folder (train.rec/train.idx); {rec_file} / {idx_file} not found "
                          "(image folders are not supported: pack them with tools/pack_rec.py)")
    layout = read_layout(rec)
    keys, _ = read_index(idx_file)
    return {"rec": os.path.abspath(rec_file), "idx": os.path.abspath(idx_file), "images": len(layout),
            "records": int(keys.size), "idx_sha256": file_sha256(idx_file)}


def array_layout(num_images, dim):
    emb_bytes = num_images * 2 * dim * 2
    return {"embeddings": {"dtype": "float16", "shape": [num_images, 2, dim], "offset": HEADER_BYTES,
                           "l2_normalised": True, "views": VIEWS},
            "norms": {"dtype": "float32", "shape": [num_images, 2], "offset": HEADER_BYTES + emb_bytes}}


def make_header(teacher, dataset, input_size, chunk_size, batch_size):
    n = int(dataset["images"])
    header = {"format": FORMAT, "version": FORMAT_VERSION, "teacher": teacher, "dataset": dataset,
            "preprocessing": {"input_size": int(input_size), "normalisation": NORMALISATION, "views": VIEWS},
            "arrays": array_layout(n, int(teacher["embedding_size"])),
            "build": {"chunk_size": int(chunk_size), "batch_size": int(batch_size),
                      "num_chunks": math.ceil(n / int(chunk_size))}}
    return json.loads(header_bytes(header))  # as it reads back from a file (tuples -> lists), for comparisons


def header_bytes(header):
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")


def header_digest(header):
    return hashlib.sha256(header_bytes(header)).hexdigest()


def file_size(header):
    norms = header["arrays"]["norms"]
    return norms["offset"] + int(np.prod(norms["shape"])) * 4


# ---- the file ------------------------------------------------------------------------------------------------

class CacheFile:
    """An opened cache: its header and memory maps of the two arrays."""

    def __init__(self, path, header, complete, writable=False):
        self.path, self.header, self.complete = str(path), header, complete
        arrays = header["arrays"]
        mode = "r+" if writable else "r"
        emb, norms = arrays["embeddings"], arrays["norms"]
        self.embeddings = np.memmap(self.path, dtype="<f2", mode=mode, offset=emb["offset"], shape=tuple(emb["shape"]))
        self.norms = np.memmap(self.path, dtype="<f4", mode=mode, offset=norms["offset"], shape=tuple(norms["shape"]))

    @property
    def num_images(self):
        return int(self.header["dataset"]["images"])

    @property
    def dim(self):
        return int(self.header["teacher"]["embedding_size"])

    @classmethod
    def open(cls, path, writable=False):
        header, complete = read_header(path)
        expected = file_size(header)
        actual = os.path.getsize(path)
        if actual != expected:
            raise ConfigError(f"teacher cache {path} is {actual} bytes, its header announces {expected}; the file "
                              "is truncated or damaged: rebuild it with tools/cache_teacher.py --restart")
        return cls(path, header, complete, writable)

    def describe_teacher(self):
        t = self.header["teacher"]
        return f"{t.get('network') or t['source']} {os.path.basename(t['file'])} sha256 {t['sha256'][:12]}"

    def lookup(self, index, flip):
        """float32 [b, d] tensor: norm * unit embedding of sample `index[i]`, view `flip[i]`."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        view = np.asarray(flip).astype(bool).reshape(-1).astype(np.int64)
        bad = np.flatnonzero((index < 0) | (index >= self.num_images))
        if bad.size:
            raise DataError(f"teacher cache {self.path}: sample index {int(index[bad[0]])} outside the "
                            f"{self.num_images} cached samples")
        norm = np.asarray(self.norms[index, view])
        missing = np.flatnonzero(~np.isfinite(norm))
        if missing.size:
            raise DataError(f"teacher cache {self.path}: sample {int(index[missing[0]])} has no embedding (its record "
                            "was unreadable when the cache was built)")
        unit = np.asarray(self.embeddings[index, view], dtype=np.float32)
        return torch.from_numpy(unit * norm[:, None])

    def flush(self):
        self.embeddings.flush()
        self.norms.flush()


def read_header(path):
    """(header dict, complete) of a cache file; ConfigError when it is not one."""
    path = str(path)
    if not os.path.isfile(path):
        raise ConfigError(f"teacher cache {path} does not exist; build it with "
                          "`python tools/cache_teacher.py CONFIG --out FILE`")
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    magic = head[:8]
    if magic not in (MAGIC_PARTIAL, MAGIC_COMPLETE) or len(head) < 16:
        raise ConfigError(f"{path} is not a teacher cache (magic {magic!r}); expected a file written by "
                          "tools/cache_teacher.py")
    (length,) = struct.unpack_from("<Q", head, 8)
    try:
        header = json.loads(head[16:16 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"teacher cache {path}: unreadable header ({exc})") from None
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise ConfigError(f"teacher cache {path}: format {header.get('format')} version {header.get('version')}, "
                          f"this code reads {FORMAT} version {FORMAT_VERSION}; rebuild it")
    return header, magic == MAGIC_COMPLETE


def create_cache_file(path, header):
    """A partial cache: the header and zero (sparse) arrays, put in place atomically."""
    blob = header_bytes(header)
    if 16 + len(blob) > HEADER_BYTES:
        raise ConfigError(f"teacher cache header of {len(blob)} bytes does not fit the {HEADER_BYTES - 16} "
                          "reserved; use shorter paths")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC_PARTIAL + struct.pack("<Q", len(blob)) + blob)
            f.truncate(file_size(header))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def mark_complete(path):
    """The commit point of a build: 8 bytes at the start of a file whose arrays are already on disk."""
    with open(path, "r+b") as f:
        f.write(MAGIC_COMPLETE)
        f.flush()
        os.fsync(f.fileno())


# ---- progress records -----------------------------------------------------------------------------------------

def progress_path(path, rank):
    return f"{path}.progress.rank{rank}.json"


def progress_files(path):
    return sorted(glob.glob(glob.escape(str(path)) + ".progress.rank*.json"))


def read_progress(path, digest, rank=None):
    """Chunk ids recorded done for the build whose header hashes to `digest` (one rank's file, or all)."""
    files = [progress_path(path, rank)] if rank is not None else progress_files(path)
    done = set()
    for name in files:
        try:
            with open(name) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue  # absent, or from an older build being replaced: its chunks are simply redone
        if record.get("header_sha256") == digest:
            done.update(int(c) for c in record.get("done", []))
    return done


def write_progress(path, rank, digest, done):
    name = progress_path(path, rank)
    tmp = f"{name}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"header_sha256": digest, "done": sorted(done)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, name)


def remove_progress(path):
    for name in progress_files(path):
        os.remove(name)


# ---- training-time checks ---------------------------------------------------------------------------------------

def open_for_training(path, dataset, input_size, embedding_size, teacher_file=None, teacher_sha=None):
    """The cache for kd.teacher_backend='cache', or a ConfigError naming what does not match."""
    header, complete = read_header(path)
    where = f"kd.teacher_cache {path}"
    if not complete:
        digest = header_digest(header)
        done = len(read_progress(path, digest))
        raise ConfigError(f"{where} is incomplete ({done} of {header['build']['num_chunks']} chunks built); finish "
                          "it by rerunning tools/cache_teacher.py with the same config (it resumes)")
    built = header["dataset"]
    if built["images"] != dataset["images"] or built["idx_sha256"] != dataset["idx_sha256"]:
        raise ConfigError(f"{where} was built for another data set: {built['rec']} ({built['images']} images, .idx "
                          f"sha256 {built['idx_sha256'][:16]}) but cfg.rec is {dataset['rec']} ({dataset['images']} "
                          f"images, .idx sha256 {dataset['idx_sha256'][:16]}); rebuild the cache for this data")
    size = header["preprocessing"]["input_size"]
    if size != int(input_size):
        raise ConfigError(f"{where} holds embeddings of {size}x{size} images but cfg.input_size={input_size}; "
                          "rebuild the cache at this input size")
    dim = header["teacher"]["embedding_size"]
    if dim != int(embedding_size):
        raise ConfigError(f"{where} holds {dim}-d teacher embeddings but kd.teacher_embedding_size={embedding_size}")
    if teacher_sha is not None and header["teacher"]["sha256"] != teacher_sha:
        raise ConfigError(f"{where} was built from teacher {header['teacher']['file']} (sha256 "
                          f"{header['teacher']['sha256'][:16]}) but the configured teacher {teacher_file} has sha256 "
                          f"{teacher_sha[:16]}; rebuild the cache or point the config at the cached teacher")
    return CacheFile.open(path)
