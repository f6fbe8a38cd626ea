"""Building the teacher cache: the configured teacher run over every training image (as stored and flipped),
on every rank of the process group, each rank writing its own chunks of the one file (file_format.py).

Building is chunked: a chunk's rows are flushed, then its id and the crc32 of its bytes are added to
`<file>.progress.rank<r>.json` (written atomically). A rerun continues with the chunks no progress record
lists; chunks are computed with the same batches whoever computes them, so the bytes equal an uninterrupted
build. After a barrier rank 0 writes the checksum table, reads the whole file back against it (a chunk damaged
between its write and now - a disk, a shared file system - is dropped from the progress records and the build
stops, so a rerun computes it again), and only then turns the magic complete (the last 8-byte write); training
refuses a partial file.
"""
import logging
import os

import numpy as np
import torch

from arcface.engine import distributed as D
from arcface.engine.device import pick_device
from arcface.engine.hooks import TrainContext
from arcface.errors import ConfigError, DataError

from ..config import resolve_kd_config
from ..teacher_backends.base import TEACHER_BACKENDS, configured_teacher_file, teacher_precision, teacher_source
from .file_format import (CacheFile, chunk_checksum, chunk_rows, create_cache_file, damaged_chunks, dataset_identity,
                          file_sha256, forget_chunks, header_digest, make_header, mark_complete, read_chunk_checksums,
                          read_header, read_progress, remove_progress, write_checksums)
from . import file_format

log = logging.getLogger("arcface")

DEFAULT_CHUNK_BATCHES = 32  # chunk = this many batches unless --chunk-size says otherwise


def teacher_identity(kd, fp16, device):
    """The header's teacher block: what computed the embeddings, with the file's sha256."""
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
    dataset = dataset_identity(cfg.rec, skip_bad_records=bool(cfg.get("skip_bad_records")))
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
    ctx = TrainContext(cfg=cfg, backbone=None, device=device, rank=D.get_rank(), world_size=D.get_world_size())
    return TEACHER_BACKENDS.get(teacher_source(kd))(kd, cfg, ctx)


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

    kd = resolve_kd_config(cfg.get("kd"))
    out = str(out or kd.get("teacher_cache") or "")
    if not out:
        raise ConfigError("no output file: pass --out FILE or set kd.teacher_cache")
    rank, world = D.get_rank(), D.get_world_size()
    device = torch.device(device) if device is not None else pick_device(cfg)

    header, done, complete = D.on_rank0(_plan, cfg, kd, out, batch_size, chunk_size, restart, device)
    if complete:
        if rank == 0:
            log.info("teacher cache %s is complete already", out)
        return out

    digest = header_digest(header)
    remaining = [c for c in range(header["build"]["num_chunks"]) if c not in done]
    mine = [int(c) for c in np.array_split(np.asarray(remaining, dtype=np.int64), world)[rank]]
    plan = _chunk_batches(mine, header)
    cache = CacheFile.open(out, writable=True)
    recorded = read_chunk_checksums(out, digest, rank)

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
                nonzero = (emb.float().norm(dim=1) > 0).reshape(2, -1).all(dim=0).cpu()
                if not bool(nonzero.all()):  # a zero embedding has no direction: lookups would refuse its row
                    bad = [w for w, f in zip(wanted, nonzero.tolist()) if not f]
                    raise DataError(f"the teacher returned all-zero embeddings for samples {bad[:8]} of {cfg.rec}; "
                                    "the teacher weights are broken; nothing was cached for this chunk")
                write_rows(cache, rows, emb)
                missing = np.asarray([w for w, r in zip(wanted, rows) if r is None], dtype=np.int64)
                if missing.size:  # NaN: lookups of these rows raise DataError
                    cache.norms[missing] = np.nan
                    cache.embeddings[missing] = np.nan
                bar.update(len(wanted))
            cache.flush()
            recorded[chunk] = chunk_checksum(cache, chunk)
            file_format.write_progress(out, rank, digest, recorded)  # the commit of a chunk (a test kills here)
        bar.close()
    del cache

    D.barrier()
    D.on_rank0(_commit, out, header, digest)
    return out


def _commit(out, header, digest):
    """Rank 0, after every rank's chunks: write the checksum table, read the file back against it, and mark it
    complete; or say which chunks are missing or damaged (those are computed again by a rerun)."""
    checksums = read_chunk_checksums(out, digest)
    missing = sorted(set(range(header["build"]["num_chunks"])) - set(checksums))
    if missing:
        raise DataError(f"teacher cache {out}: chunks {missing[:8]} were not recorded done; rerun to finish")
    write_checksums(out, header, checksums)
    cache = CacheFile.open(out)
    damaged = damaged_chunks(cache)
    if damaged:
        forget_chunks(out, digest, damaged)
        spans = ", ".join(f"chunk {c} (rows {chunk_rows(header, c)[0]}..{chunk_rows(header, c)[1] - 1})"
                          for c in damaged[:4])
        raise DataError(f"teacher cache {out}: {spans} read back differently from what was written (the disk "
                        "or a shared file system changed them); the file is not marked complete, rerun to compute "
                        "them again")
    unreadable = int((~np.isfinite(cache.norms[:, 0])).sum())
    del cache
    if unreadable:
        log.warning("teacher cache %s: %d unreadable records have no embedding", out, unreadable)
    mark_complete(out)
    remove_progress(out)
    log.info("teacher cache %s complete: %d samples x 2 views x %d-d", out, header["dataset"]["images"],
             header["teacher"]["embedding_size"])
