"""The teacher embedding cache file: the teacher run once over the training .rec, kept as ONE memory-mapped array.

Peers that wrote one file per sample found it slower than recomputing (research anchors.md 6.6); here every
embedding lives in one contiguous array, read back by numpy fancy indexing on a memory map, so a lookup costs
a few page reads and no file opens.

File layout (little-endian):

    [0, 8)                 magic: MAGIC_PARTIAL while being built, MAGIC_COMPLETE once every chunk is written
    [8, 16)                uint64: byte length of the JSON header
    [16, 16 + length)      the header, JSON with sorted keys (teacher, preprocessing, dataset, arrays, build)
    ... zeros up to HEADER_BYTES - 4
    [HEADER_BYTES - 4, HEADER_BYTES)   uint32: crc32 of bytes [8, 16 + length) (the length and the header)
    embeddings             float16 [N, 2, d]: L2-normalised teacher embeddings; [:, 0] the image as stored,
                           [:, 1] horizontally flipped; row i is the dataset's sample index i
    norms                  float32 [N, 2]: L2 norms of the raw embeddings (NaN: the record was unreadable)
    checksums              uint32 [num_chunks]: crc32 of chunk c's embedding rows, then its norm rows

Why checksums: a flipped byte in 12 GB of embeddings trains silently (a NaN row surfaces much later as a
diverged loss). Each chunk's crc32 is taken by the rank that computed it, kept in its progress record, written
into the table by rank 0 at the end of the build and checked against the file before the build is marked
complete; training checks every chunk when it opens the cache (threads, about a second per GB per core), and
every row it looks up (finite, positive norm, unit length). Version 1 files (no checksums) are refused with a
rebuild message.

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
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from arcface.data.layout import read_layout, rec_paths
from arcface.data.recordio import read_index
from arcface.errors import ConfigError, DataError

FORMAT = "ukd-teacher-cache"
FORMAT_VERSION = 2
MAGIC_PARTIAL = b"UKDTC\x00P1"
MAGIC_COMPLETE = b"UKDTC\x00C1"
HEADER_BYTES = 16384
NORMALISATION = "(pixel - 127.5) / 127.5, RGB, NCHW float32; PIL bilinear resize to input_size when stored " \
                "at another size"
VIEWS = ["as stored", "horizontally flipped"]
_HEADER_CRC = struct.Struct("<I")
# a cached unit embedding may be this far from length 1 (float16 rounding is ~1e-3): further means damage
UNIT_TOLERANCE = 1e-2


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


def dataset_identity(rec, what="the teacher cache needs cfg.rec to be", skip_bad_records=False):
    """{rec, idx, images, records, idx_sha256} of a RecordIO training set; with skip_bad_records the images the
    label scan cannot read are left out, as the training dataset leaves them out (the rows stay aligned)."""
    if rec is None or str(rec) == "synthetic":
        raise ConfigError(f"{what} a RecordIO folder (train.rec/train.idx), got rec={rec!r}")
    rec_file, idx_file = rec_paths(rec)
    if not (os.path.isfile(rec_file) and os.path.isfile(idx_file)):
        raise ConfigError(f"{what} a RecordIO folder (train.rec/train.idx); {rec_file} / {idx_file} not found "
                          "(image folders are not supported: pack them with tools/pack_rec.py)")
    layout = read_layout(rec, skip_bad_records=bool(skip_bad_records))
    keys, _ = read_index(idx_file)
    return {"rec": os.path.abspath(rec_file), "idx": os.path.abspath(idx_file), "images": len(layout),
            "records": int(keys.size), "idx_sha256": file_sha256(idx_file)}


def array_layout(num_images, dim, num_chunks):
    emb_bytes = num_images * 2 * dim * 2
    norms_offset = HEADER_BYTES + emb_bytes
    return {"embeddings": {"dtype": "float16", "shape": [num_images, 2, dim], "offset": HEADER_BYTES,
                           "l2_normalised": True, "views": VIEWS},
            "norms": {"dtype": "float32", "shape": [num_images, 2], "offset": norms_offset},
            "checksums": {"dtype": "uint32", "shape": [num_chunks], "offset": norms_offset + num_images * 2 * 4,
                          "algorithm": "crc32 of each chunk's embedding rows, then its norm rows"}}


def make_header(teacher, dataset, input_size, chunk_size, batch_size):
    n = int(dataset["images"])
    num_chunks = math.ceil(n / int(chunk_size))
    header = {"format": FORMAT, "version": FORMAT_VERSION, "teacher": teacher, "dataset": dataset,
            "preprocessing": {"input_size": int(input_size), "normalisation": NORMALISATION, "views": VIEWS},
            "arrays": array_layout(n, int(teacher["embedding_size"]), num_chunks),
            "build": {"chunk_size": int(chunk_size), "batch_size": int(batch_size), "num_chunks": num_chunks}}
    return json.loads(header_bytes(header))  # as it reads back from a file (tuples -> lists), for comparisons


def header_bytes(header):
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")


def header_digest(header):
    return hashlib.sha256(header_bytes(header)).hexdigest()


def file_size(header):
    table = header["arrays"]["checksums"]
    return table["offset"] + int(np.prod(table["shape"])) * 4


def chunk_rows(header, chunk):
    """(first, end) sample rows of chunk `chunk`."""
    size, n = int(header["build"]["chunk_size"]), int(header["dataset"]["images"])
    return chunk * size, min(n, (chunk + 1) * size)


def chunk_checksum(cache, chunk):
    """crc32 of a chunk's rows as they are in the file (embeddings, then norms)."""
    first, end = chunk_rows(cache.header, chunk)
    return zlib.crc32(cache.norms[first:end], zlib.crc32(cache.embeddings[first:end]))


def write_checksums(path, header, checksums):
    """The checksum table (one uint32 per chunk, in chunk order), flushed to disk."""
    table = header["arrays"]["checksums"]
    values = np.asarray([int(checksums[c]) for c in range(int(table["shape"][0]))], dtype="<u4")
    with open(path, "r+b") as f:
        f.seek(int(table["offset"]))
        f.write(values.tobytes())
        f.flush()
        os.fsync(f.fileno())


def verification_threads():
    """CPU threads for one process's checksum pass: the cores shared by this machine's ranks, at most 8."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(8, (os.cpu_count() or 1) // local))


def damaged_chunks(cache, chunks=None):
    """Chunks whose bytes differ from the checksum table (zlib releases the GIL, so threads run in parallel)."""
    chunks = range(int(cache.header["build"]["num_chunks"])) if chunks is None else list(chunks)
    with ThreadPoolExecutor(verification_threads()) as pool:
        actual = list(pool.map(lambda c: chunk_checksum(cache, c), chunks))
    return [c for c, crc in zip(chunks, actual) if crc != int(cache.checksums[c])]


def verify_chunks(cache):
    """DataError naming the first damaged chunk (its rows and the file), else the cache itself."""
    damaged = damaged_chunks(cache)
    if damaged:
        first, end = chunk_rows(cache.header, damaged[0])
        more = f" and {len(damaged) - 1} more chunks" if len(damaged) > 1 else ""
        raise DataError(f"teacher cache {cache.path}: chunk {damaged[0]} (rows {first}..{end - 1}){more} does not "
                        "match its checksum: the file was damaged after it was built (disk, copy, edit); rebuild "
                        "it with tools/cache_teacher.py CONFIG --out FILE --restart")
    return cache


# ---- the file ------------------------------------------------------------------------------------------------

class CacheFile:
    """An opened cache: its header and memory maps of the two arrays."""

    def __init__(self, path, header, complete, writable=False):
        self.path, self.header, self.complete = str(path), header, complete
        arrays = header["arrays"]
        mode = "r+" if writable else "r"
        emb, norms, table = arrays["embeddings"], arrays["norms"], arrays["checksums"]
        self.embeddings = np.memmap(self.path, dtype="<f2", mode=mode, offset=emb["offset"], shape=tuple(emb["shape"]))
        self.norms = np.memmap(self.path, dtype="<f4", mode=mode, offset=norms["offset"], shape=tuple(norms["shape"]))
        self.checksums = np.memmap(self.path, dtype="<u4", mode="r", offset=table["offset"],
                                   shape=tuple(table["shape"]))

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
        unit = np.asarray(self.embeddings[index, view], dtype=np.float32)
        self._check_rows(index, view, norm, unit)
        return torch.from_numpy(unit * norm[:, None])

    def _check_rows(self, index, view, norm, unit):
        """DataError for a row the build marked unreadable (norm and embedding NaN) or one that is damaged: not
        finite, a norm that is not positive, a unit embedding that is not of length 1."""
        with np.errstate(invalid="ignore", over="ignore"):
            finite = np.isfinite(unit).all(axis=1)
            length = np.sqrt(np.square(unit).sum(axis=1))
            missing = np.isnan(norm) & np.isnan(unit).all(axis=1)
            bad_norm = ~(np.isfinite(norm) & (norm > 0))
            bad_length = finite & (np.abs(length - 1.0) > UNIT_TOLERANCE)
        if missing.any():
            i = int(np.flatnonzero(missing)[0])
            raise DataError(f"teacher cache {self.path}: sample {int(index[i])} has no embedding (its record "
                            "was unreadable when the cache was built)")
        bad = np.flatnonzero(~finite | bad_norm | bad_length)
        if bad.size:
            i = int(bad[0])
            problem = ("its embedding is not finite" if not finite[i] else
                       f"its norm {float(norm[i]):g} is not a positive finite number" if bad_norm[i] else
                       f"its unit embedding has length {float(length[i]):.4f}, not 1")
            raise DataError(f"teacher cache {self.path}: sample {int(index[i])} ({VIEWS[int(view[i])]} view) is "
                            f"damaged: {problem}; rebuild the cache with tools/cache_teacher.py CONFIG --out FILE "
                            "--restart")

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
    rebuild = "rebuild it with tools/cache_teacher.py CONFIG --out FILE --restart"
    try:
        if 16 + length > HEADER_BYTES - _HEADER_CRC.size:
            raise ValueError(f"header length {length} does not fit the {HEADER_BYTES}-byte header area")
        header = json.loads(head[16:16 + length].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError(f"the header is a {type(header).__name__}, not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"teacher cache {path}: unreadable header ({exc}); {rebuild}") from None
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        older = " (written before per-chunk checksums)" if header.get("version") == 1 else ""
        raise ConfigError(f"teacher cache {path}: format {header.get('format')} version {header.get('version')}"
                          f"{older}, this code reads {FORMAT} version {FORMAT_VERSION}; {rebuild}")
    (stored,) = _HEADER_CRC.unpack_from(head, HEADER_BYTES - _HEADER_CRC.size)
    if stored != zlib.crc32(head[8:16 + length]):
        raise DataError(f"teacher cache {path}: the header does not match its checksum (the file was damaged); "
                        f"{rebuild}")
    return header, magic == MAGIC_COMPLETE


def create_cache_file(path, header):
    """A partial cache: the header and zero (sparse) arrays, put in place atomically."""
    blob = header_bytes(header)
    if 16 + len(blob) > HEADER_BYTES - _HEADER_CRC.size:
        raise ConfigError(f"teacher cache header of {len(blob)} bytes does not fit the "
                          f"{HEADER_BYTES - 16 - _HEADER_CRC.size} reserved; use shorter paths")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    head = struct.pack("<Q", len(blob)) + blob
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC_PARTIAL + head)
            f.seek(HEADER_BYTES - _HEADER_CRC.size)
            f.write(_HEADER_CRC.pack(zlib.crc32(head)))
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
    return set(read_chunk_checksums(path, digest, rank))


def read_chunk_checksums(path, digest, rank=None):
    """{chunk id: crc32} recorded done for the build whose header hashes to `digest` (one rank's file, or all).
    A chunk recorded without its checksum counts as not done."""
    files = [progress_path(path, rank)] if rank is not None else progress_files(path)
    done = {}
    for name in files:
        try:
            with open(name) as f:
                record = json.load(f)
            if record.get("header_sha256") == digest:
                done.update({int(c): int(crc) for c, crc in record.get("crc32", {}).items()})
        except (OSError, ValueError, TypeError, AttributeError):
            continue  # absent, damaged, or from an older build being replaced: its chunks are simply redone
    return done


def write_progress(path, rank, digest, done):
    """Record `done` ({chunk id: crc32}) for this rank, atomically: the commit point of its chunks."""
    name = progress_path(path, rank)
    tmp = f"{name}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"header_sha256": digest, "done": sorted(done),
                   "crc32": {str(c): int(done[c]) for c in sorted(done)}}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, name)


def forget_chunks(path, digest, chunks):
    """Drop `chunks` from every rank's progress record, so the next run computes them again."""
    chunks = set(chunks)
    for name in progress_files(path):
        rank = int(name.rsplit(".progress.rank", 1)[1].split(".", 1)[0])
        kept = {c: crc for c, crc in read_chunk_checksums(path, digest, rank).items() if c not in chunks}
        write_progress(path, rank, digest, kept)


def remove_progress(path):
    for name in progress_files(path):
        os.remove(name)


# ---- training-time checks ---------------------------------------------------------------------------------------

def open_for_training(path, dataset, input_size, embedding_size, teacher_file=None, teacher_sha=None):
    """The cache for kd.teacher_backend='cache', or a ConfigError naming what does not match (a DataError when
    its bytes do not match their checksums)."""
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
    return verify_chunks(CacheFile.open(path))
