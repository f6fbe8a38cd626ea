"""The teacher embedding cache: the teacher run once over the training .rec, kept as ONE memory-mapped array.

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

Building is chunked: a chunk's rows are flushed, then its id is added to `<file>.progress.rank<r>.json`
(written atomically). A rerun continues with the chunks no progress record lists; chunks are computed with
the same batches whoever computes them, so the bytes equal an uninterrupted build. The magic turns complete
(last 8-byte write, after a barrier) only when every chunk is recorded; training refuses a partial file.
"""
import glob
import hashlib
import json
import logging
import math
import os
import struct

import numpy as np
import torch

from arcface.data.layout import read_layout, rec_paths
from arcface.data.recordio import read_index
from arcface.engine import distributed as D
from arcface.errors import ConfigError, DataError, UKDError

log = logging.getLogger("arcface")

FORMAT = "ukd-teacher-cache"
FORMAT_VERSION = 1
MAGIC_PARTIAL = b"UKDTC\x00P1"
MAGIC_COMPLETE = b"UKDTC\x00C1"
HEADER_BYTES = 16384
NORMALISATION = "(pixel - 127.5) / 127.5, RGB, NCHW float32; PIL bilinear resize to input_size when stored " \
                "at another size"
VIEWS = ["as stored", "horizontally flipped"]
DEFAULT_CHUNK_BATCHES = 32  # chunk = this many batches unless --chunk-size says otherwise


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


def teacher_precision(source, fp16, device):
    if source == "onnx":
        return "onnxruntime float32"
    if not fp16:
        return "float32"
    return "float16 autocast" if torch.device(device).type == "cuda" else "bfloat16 autocast"


def teacher_identity(kd, fp16, device):
    """The header's teacher block: what computed the embeddings, with the file's sha256."""
    from .teacher_backends import configured_teacher_file, teacher_source
    source = teacher_source(kd)
    path = configured_teacher_file(kd)
    if not path:
        key = "kd.teacher_onnx" if source == "onnx" else "kd.teacher_weights"
        raise ConfigError(f"building a teacher cache needs the teacher: set {key}")
    if not os.path.isfile(str(path)):
        key = "kd.teacher_onnx" if source == "onnx" else "kd.teacher_weights"
        raise ConfigError(f"{key}: teacher file {path} does not exist")
    block = {"source": source, "file": os.path.abspath(str(path)), "sha256": file_sha256(path),
             "embedding_size": int(kd.teacher_embedding_size), "precision": teacher_precision(source, fp16, device)}
    if source == "torch":
        block["network"] = kd.teacher_network
        block["network_kwargs"] = dict(kd.get("teacher_network_kwargs") or {})
    else:
        block["onnx"] = {"layout": kd.get("teacher_onnx_layout", "NCHW"),
                         "channels": kd.get("teacher_onnx_channels", "RGB"),
                         "normalize": kd.get("teacher_onnx_normalize", "arcface")}
    return block


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


# ---- building ------------------------------------------------------------------------------------------------------

def _diff(a, b, prefix=""):
    """Dotted keys whose values differ between two header dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: file {va!r} vs now {vb!r}")
    return out


def _plan(cfg, kd, out, batch_size, chunk_size, restart, device):
    """Rank 0: the header of this build, creating or resuming the file; returns (header, done, complete)."""
    dataset = dataset_identity(cfg.rec)
    teacher = teacher_identity(kd, bool(cfg.get("fp16")), device)
    existing = None
    if os.path.exists(out) and not restart:
        existing, complete = read_header(out)
    previous = existing["build"] if existing else {}
    batch_size = int(batch_size or previous.get("batch_size") or cfg.batch_size)
    chunk_size = int(chunk_size or previous.get("chunk_size") or batch_size * DEFAULT_CHUNK_BATCHES)
    if batch_size <= 0 or chunk_size <= 0 or chunk_size % batch_size:
        raise ConfigError(f"--chunk-size ({chunk_size}) must be a positive multiple of --batch-size ({batch_size})")
    header = make_header(teacher, dataset, cfg.input_size, chunk_size, batch_size)
    digest = header_digest(header)
    if existing is not None:
        if existing != header:
            changes = "; ".join(_diff(existing, header)[:6])
            raise ConfigError(f"{out} was {'built' if complete else 'started'} with other settings ({changes}); "
                              "pass --restart to discard it and build anew, or use another --out")
        CacheFile.open(out)  # size check
        if complete:
            return header, set(range(header["build"]["num_chunks"])), True
        return header, read_progress(out, digest), False
    remove_progress(out)
    create_cache_file(out, header)
    return header, set(), False


def _chunk_batches(chunks, header):
    n, chunk, batch = header["dataset"]["images"], header["build"]["chunk_size"], header["build"]["batch_size"]
    plan = []
    for c in chunks:
        start, end = c * chunk, min(n, (c + 1) * chunk)
        plan.append((c, [list(range(s, min(end, s + batch))) for s in range(start, end, batch)]))
    return plan


def _teacher(kd, cfg, device):
    from arcface.engine.hooks import TrainContext
    from .teacher_backends import BACKENDS, teacher_source
    ctx = TrainContext(cfg=cfg, backbone=None, device=device, rank=D.get_rank(), world_size=D.get_world_size())
    return BACKENDS[teacher_source(kd)](kd, cfg, ctx)


def write_rows(cache, rows, embeddings):
    """Store the [2b, d] teacher output of (originals, flips) for dataset rows `rows` (None: skip the row)."""
    b = len(rows)
    pairs = embeddings.float().reshape(2, b, -1).transpose(0, 1)            # [b, 2, d]
    norms = pairs.norm(dim=2)                                                # [b, 2]
    unit = (pairs / norms.clamp_min(1e-12).unsqueeze(2)).half().cpu().numpy()
    norms = norms.cpu().numpy()
    ok = np.array([r is not None for r in rows])
    target = np.array([r for r in rows if r is not None], dtype=np.int64)
    cache.embeddings[target] = unit[ok]
    cache.norms[target] = norms[ok]


def build_teacher_cache(cfg, out=None, batch_size=None, chunk_size=None, num_workers=None, restart=False,
                        progress=True, device=None):
    """Run the configured teacher over cfg.rec and write (or finish) the cache at `out`; returns its path.

    Every rank of the current process group computes its share of the chunks that are still missing; call it
    on every rank. batch_size / chunk_size default to the ones of a partial file being resumed, else to
    cfg.batch_size and 32 batches.
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from arcface.data.datasets import RecordDataset
    from arcface.engine.trainer import pick_device
    from .config import resolve_kd_config

    kd = resolve_kd_config(cfg.get("kd"))
    out = str(out or kd.get("teacher_cache") or "")
    if not out:
        raise ConfigError("no output file: pass --out FILE or set kd.teacher_cache")
    rank, world = D.get_rank(), D.get_world_size()
    device = torch.device(device) if device is not None else pick_device(cfg)

    status = None
    if rank == 0:
        try:
            status = ("ok",) + _plan(cfg, kd, out, batch_size, chunk_size, restart, device)
        except UKDError as exc:
            status = ("error", type(exc).__name__, str(exc))
    status = D.broadcast_object(status)
    if status[0] == "error":
        raise {"ConfigError": ConfigError, "DataError": DataError}.get(status[1], UKDError)(status[2])
    _, header, done, complete = status
    if complete:
        if rank == 0:
            log.info("teacher cache %s is complete already", out)
        return out

    digest = header_digest(header)
    remaining = [c for c in range(header["build"]["num_chunks"]) if c not in done]
    mine = [int(c) for c in np.array_split(np.asarray(remaining, dtype=np.int64), world)[rank]]
    plan = _chunk_batches(mine, header)
    cache = CacheFile.open(out, writable=True)
    recorded = read_progress(out, digest, rank)

    if plan:
        teacher = _teacher(kd, cfg, device)
        dataset = RecordDataset(cfg.rec, input_size=int(cfg.input_size), flip=False, return_index=True,
                                skip_bad_records=bool(cfg.get("skip_bad_records")))
        if len(dataset) != cache.num_images:
            raise DataError(f"{cfg.rec} holds {len(dataset)} images, the cache header {cache.num_images}")
        batches = [b for _, chunk_batches in plan for b in chunk_batches]
        workers = int(num_workers if num_workers is not None else (cfg.get("num_workers") or 0))
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda")
        bar = tqdm(total=sum(len(b) for b in batches), unit="img", desc=f"cache teacher (rank {rank})",
                   disable=not progress or rank != 0)
        items = iter(loader)
        for chunk, chunk_batches in plan:
            for wanted in chunk_batches:
                images, _, got, _ = next(items)
                # a bad record (skip_bad_records) comes back as another index: its row is marked missing
                rows = [w if w == g else None for w, g in zip(wanted, got.tolist())]
                images = images.to(device, non_blocking=True)
                with torch.inference_mode():
                    emb = teacher(torch.cat([images, images.flip(-1)]))
                finite = torch.isfinite(emb).all(dim=1).reshape(2, -1).all(dim=0).cpu()
                if not bool(finite.all()):
                    bad = [w for w, f in zip(wanted, finite.tolist()) if not f]
                    raise DataError(f"the teacher returned non-finite embeddings for samples {bad[:8]} of {cfg.rec}; "
                                    "the teacher weights or their precision (fp16) are broken; nothing was cached "
                                    "for this chunk")
                write_rows(cache, rows, emb)
                missing = np.asarray([w for w, r in zip(wanted, rows) if r is None], dtype=np.int64)
                if missing.size:  # NaN: lookups of these rows raise DataError
                    cache.norms[missing] = np.nan
                    cache.embeddings[missing] = np.nan
                bar.update(len(wanted))
            cache.flush()
            recorded.add(chunk)
            write_progress(out, rank, digest, recorded)
        bar.close()
    del cache

    D.barrier()
    status = None
    if rank == 0:
        done = read_progress(out, digest)
        missing = sorted(set(range(header["build"]["num_chunks"])) - done)
        if missing:
            status = f"teacher cache {out}: chunks {missing[:8]} were not recorded done; rerun to finish"
        else:
            norms = np.memmap(out, dtype="<f4", mode="r", offset=header["arrays"]["norms"]["offset"],
                              shape=tuple(header["arrays"]["norms"]["shape"]))
            unreadable = int((~np.isfinite(norms[:, 0])).sum())
            del norms
            if unreadable:
                log.warning("teacher cache %s: %d unreadable records have no embedding", out, unreadable)
            mark_complete(out)
            remove_progress(out)
            log.info("teacher cache %s complete: %d samples x 2 views x %d-d", out, header["dataset"]["images"],
                     header["teacher"]["embedding_size"])
    status = D.broadcast_object(status)
    if status:
        raise DataError(status)
    return out
