"""A teacher's class centres for one shard of Partial FC: read from the teacher's own sharded head, or made from the
teacher embedding cache (the normalised mean of each identity's embeddings).

Both sources give the rows of classes [class_start, class_start + num_local) only, so a rank never holds more than
its shard, whatever the world size the teacher was trained with.
"""
import os
import re

import numpy as np
import torch

from arcface.errors import ConfigError
from arcface.partial_fc import shard_range

SHARD_FILE = re.compile(r"^checkpoint_gpu_(\d+)\.pt$")
CHUNK_ROWS = 1 << 16   # cache rows read at a time: bounds memory on datasets of millions of images


def _open_checkpoint(path):
    """The checkpoint object with its tensors memory-mapped where the file format allows (only the rows read are
    paged in), else loaded."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
        pass
    except Exception as exc:
        raise ConfigError(f"teacher head {path} cannot be read ({type(exc).__name__}: {exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ConfigError(f"teacher head {path} cannot be read ({type(exc).__name__}: {exc})") from exc


def teacher_head_shards(folder):
    """[(rank, path, shard tensor)] of the checkpoint_gpu_<rank>.pt files of a run folder, checked to be ranks
    0 .. W-1 and to carry a Partial FC shard (`state_dict_softmax_fc` -> `weight`)."""
    folder = str(folder)
    if not os.path.isdir(folder):
        raise ConfigError(f"teacher head {folder} is not a folder; name the teacher run's output folder, the one "
                          "holding checkpoint_gpu_<rank>.pt")
    found = sorted((int(m.group(1)), os.path.join(folder, name))
                   for name in os.listdir(folder) for m in [SHARD_FILE.match(name)] if m)
    if not found:
        raise ConfigError(f"teacher head {folder} holds no checkpoint_gpu_<rank>.pt (the teacher must have been "
                          "trained with save_all_states=True, as arcface_torch's option of that name)")
    ranks = [r for r, _ in found]
    if ranks != list(range(len(found))):
        raise ConfigError(f"teacher head {folder}: the shards do not tile the classes: found ranks {ranks}, "
                          f"expected 0 .. {len(found) - 1} without gaps")
    shards = []
    for rank, path in found:
        ckpt = _open_checkpoint(path)
        weight = (ckpt.get("state_dict_softmax_fc") or {}).get("weight") if isinstance(ckpt, dict) else None
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ConfigError(f"teacher head {path} has no Partial FC shard (state_dict_softmax_fc -> weight); is "
                              "it a model.pt / backbone.pth rather than a checkpoint_gpu_<rank>.pt?")
        saved_world = ckpt.get("world_size")
        if saved_world is not None and int(saved_world) != len(found):
            raise ConfigError(f"teacher head {path} was written by a run of {saved_world} processes but {folder} "
                              f"holds {len(found)} shards: the shards do not tile the classes")
        shards.append((rank, path, weight, ckpt.get("num_classes")))
    return shards


def centres_from_checkpoints(folder, num_classes, embedding_size, class_start, num_local):
    """[num_local, d] float32: rows class_start ... of the teacher's centres, from its sharded Partial FC."""
    shards = teacher_head_shards(folder)
    world = len(shards)
    total = sum(int(w.shape[0]) for _, _, w, _ in shards)
    dims = sorted({int(w.shape[1]) for _, _, w, _ in shards})
    if dims != [int(embedding_size)]:
        raise ConfigError(f"teacher head {folder} holds {dims if len(dims) > 1 else dims[0]}-d centres but the "
                          f"student's embedding_size is {embedding_size}: the student is trained against the "
                          "teacher's classifier, so both must have the same embedding size")
    if total != int(num_classes):
        raise ConfigError(f"teacher head {folder} holds {total} class centres but num_classes is {num_classes}: "
                          "the teacher's classifier must cover exactly the student's identities")
    out = torch.empty(int(num_local), int(embedding_size), dtype=torch.float32)
    for rank, path, weight, saved_classes in shards:
        start, rows = shard_range(total, rank, world)
        if saved_classes is not None and int(saved_classes) != total:
            raise ConfigError(f"teacher head {path} was written by a run of {saved_classes} classes but the shards "
                              f"of {folder} hold {total} rows: the shards do not tile the classes")
        if int(weight.shape[0]) != rows:
            raise ConfigError(f"teacher head {path} holds {weight.shape[0]} rows, but {total} classes over {world} "
                              f"shards put {rows} on rank {rank}: the shards do not tile the classes")
        lo, hi = max(start, class_start), min(start + rows, class_start + num_local)
        if lo < hi:
            out[lo - class_start:hi - class_start] = weight[lo - start:hi - start].float()
    return out


def centres_from_cache(cache, labels, class_start, num_local):
    """[num_local, d] float32: per class of the shard, the normalised mean of its samples' unit teacher embeddings
    (both views, as stored and flipped), from an opened teacher cache (cache.file_format.CacheFile)."""
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != cache.num_images:
        raise ConfigError(f"teacher cache {cache.path} holds {cache.num_images} samples but the training loader "
                          f"labels {labels.shape[0]}")
    rows = labels.astype(np.int64) - int(class_start)
    members = np.flatnonzero((rows >= 0) & (rows < int(num_local)))
    sums = np.zeros((int(num_local), cache.dim), dtype=np.float64)
    counts = np.zeros(int(num_local), dtype=np.int64)
    for start in range(0, members.size, CHUNK_ROWS):
        index = members[start:start + CHUNK_ROWS]
        unit = np.asarray(cache.embeddings[index], dtype=np.float64)          # [m, 2, d]
        valid = np.isfinite(np.asarray(cache.norms[index]))                   # [m, 2]: False = unreadable record
        np.add.at(sums, rows[index], (unit * valid[:, :, None]).sum(axis=1))
        np.add.at(counts, rows[index], valid.sum(axis=1))
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        first = ", ".join(str(int(c) + int(class_start)) for c in empty[:5])
        raise ConfigError(f"teacher cache {cache.path}: {empty.size} class(es) of this shard have no readable "
                          f"training image (first: {first}), so the cache cannot give them a centre; use the "
                          "teacher's own head (teacher_head) or set num_classes to the identities present")
    centres = torch.from_numpy(sums)
    return torch.nn.functional.normalize(centres, dim=1).float()
