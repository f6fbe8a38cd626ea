"""NVIDIA DALI training loader (optional: `pip install nvidia-dali-cuda120`), a drop-in TrainLoader.

Fixes of upstream's DALI path (research host.md 4.1):
* insightface-layout recs (header + identity records) crash DALI's decoder (#2235): DALI reads a filtered
  index listing only the image records; the .rec is untouched.
* labels are cast to int64 and squeezed, array labels reduced to their first value (#1437: loss 69.08).
* every rank yields the same number of full batches (#1890, #2015): shards may differ by one sample,
  so each rank stops at (N // world_size) // batch_size and drops the rest.
* without CUDA the pipeline runs on the CPU (device_id=None, CPU decoder), so it is testable anywhere.
"""
import hashlib
import logging
import os

import torch

from ..errors import ConfigError, DataError
from .batch import Batch
from .datasets import decode_image
from .layout import INSIGHTFACE, read_layout, unpack_record
from .recordio import RecordIO

log = logging.getLogger(__name__)

READER_NAME = "Reader"
SHUFFLE_BUFFER = 32768  # upstream's initial_fill: a buffer, so a grouped rec must be shuffled first


def import_dali():
    """(dali module, fn, types, pipeline_def, DALIGenericIterator, LastBatchPolicy) or a clear ConfigError."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError as exc:
        raise ConfigError(f"dali=True but NVIDIA DALI is not importable ({exc}); install it with "
                          "`pip install nvidia-dali-cuda120` (or the [dali] extra), or set dali=False") from None
    return dali, fn, types, pipeline_def, DALIGenericIterator, LastBatchPolicy


def _default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "arcface", "dali")


def image_index_path(layout, cache_dir=None):
    """An .idx listing only the image records of `layout` (written once, atomically; the original .idx
    when every record is an image). Placed next to the data, or in cache_dir if that folder is read-only."""
    if layout.kind != INSIGHTFACE:
        return layout.idx_path
    lines = "".join(f"{k}\t{o}\n" for k, o in zip(layout.image_keys.tolist(), layout.offsets.tolist()))
    digest = hashlib.sha1(lines.encode()).hexdigest()[:16]
    candidates = [os.path.splitext(layout.idx_path)[0] + ".images.idx"]
    tag = hashlib.sha1(os.path.abspath(layout.rec_path).encode()).hexdigest()[:16]
    candidates.append(os.path.join(cache_dir or _default_cache_dir(), f"{tag}.images.idx"))
    for path in candidates:
        if os.path.isfile(path) and os.path.isfile(path + ".sha1"):
            with open(path + ".sha1") as f:
                if f.read().strip() == digest:
                    return path
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            for target, text in ((path, lines), (path + ".sha1", digest + "\n")):
                tmp = f"{target}.{os.getpid()}.tmp"
                with open(tmp, "w") as f:
                    f.write(text)
                os.replace(tmp, target)
            return path
        except OSError as exc:
            log.info("cannot write the DALI image index at %s (%s)", path, exc)
    raise DataError(f"could not write a filtered DALI index for {layout.rec_path} in {candidates}")


def _stored_size(layout):
    key, offset = int(layout.image_keys[0]), int(layout.offsets[0])
    reader = RecordIO(layout.rec_path, "r")
    try:
        _, payload = unpack_record(reader.read_at(offset, key), layout.rec_path, key, offset)
    finally:
        reader.close()
    w, h = decode_image(payload, f"{layout.rec_path} key {key} at byte offset {offset}").size
    return h, w


def build_pipeline(rec_path, index_path, batch_size, rank, world_size, seed, device_id=None, num_threads=2,
                   input_size=112, stored_size=(112, 112), flip=True, dali_aug=False, shuffle=True,
                   initial_fill=SHUFFLE_BUFFER, prefetch_queue_depth=1):
    """The DALI pipeline: read (sharded) -> decode RGB -> [resize] -> [aug] -> mirror + normalise, CHW.
    device_id=None builds the CPU pipeline (no CUDA needed)."""
    _, fn, types, pipeline_def, _, _ = import_dali()
    decode_device = "cpu" if device_id is None else "mixed"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed + rank,
                  prefetch_queue_depth=prefetch_queue_depth)
    def pipe():
        jpegs, labels = fn.readers.mxnet(path=[rec_path], index_path=[index_path], initial_fill=initial_fill,
                                         num_shards=world_size, shard_id=rank, random_shuffle=shuffle,
                                         pad_last_batch=False, name=READER_NAME)
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
        if tuple(stored_size) != (input_size, input_size):
            images = fn.resize(images, resize_x=input_size, resize_y=input_size)
        if dali_aug:
            images = _augment(fn, types, images, input_size)
        mirror = fn.random.coin_flip(probability=0.5) if flip else 0
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=[127.5] * 3,
                                          std=[127.5] * 3, mirror=mirror)
        return images, labels[0]  # array labels -> their first value (the class)

    return pipe()


def _choose(fn, types, condition, when_true, when_false):
    c = fn.cast(condition, dtype=types.FLOAT)
    out = c * fn.cast(when_true, dtype=types.FLOAT) + (1.0 - c) * fn.cast(when_false, dtype=types.FLOAT)
    return fn.cast(out, dtype=types.UINT8)


def _augment(fn, types, images, size):
    """Upstream's optional DALI augmentation, same kinds and rates: 10% down-up resize to 50-80% of the
    side, 20% gaussian blur, 20% HSV jitter, 10% grayscale."""
    small = fn.random.uniform(range=(size * 0.5, size * 0.8))
    resized = fn.resize(fn.resize(images, resize_x=small, resize_y=small), resize_x=size, resize_y=size)
    images = _choose(fn, types, fn.random.coin_flip(probability=0.1), resized, images)
    blurred = fn.gaussian_blur(images, window_size=5, sigma=fn.random.uniform(range=(0.5, 1.5)))
    images = _choose(fn, types, fn.random.coin_flip(probability=0.2), blurred, images)
    jittered = fn.hsv(images, hue=fn.random.uniform(range=(-20.0, 20.0)),
                      saturation=fn.random.uniform(range=(0.7, 1.3)), value=fn.random.uniform(range=(0.7, 1.3)))
    images = _choose(fn, types, fn.random.coin_flip(probability=0.2), jittered, images)
    gray = fn.color_space_conversion(fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY),
                                     image_type=types.GRAY, output_type=types.RGB)
    return _choose(fn, types, fn.random.coin_flip(probability=0.1), gray, images)


class DaliTrainLoader:
    """TrainLoader-compatible DALI loader: Batch(images, labels) on the device, index/flip None."""

    def __init__(self, root, batch_size, device="cpu", rank=0, world_size=1, seed=0, num_threads=2,
                 input_size=112, flip=True, dali_aug=False, num_classes=None, shuffle=True, cache_dir=None,
                 initial_fill=SHUFFLE_BUFFER):
        _, _, _, _, DALIGenericIterator, LastBatchPolicy = import_dali()
        self.device = torch.device(device)
        self.layout = read_layout(root, num_classes)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        n = len(self.layout)
        self.batches_per_epoch = (n // self.world_size) // self.batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f"the training data has {n} images, fewer than one batch of {self.batch_size} "
                            f"on each of {self.world_size} ranks; lower batch_size or add data")
        if self.layout.kind == INSIGHTFACE:
            log.info("DALI reads %s through a filtered image-only index; its shuffle buffer holds %d samples, "
                     "so shuffle a grouped rec first (tools/pack_rec.py shuffle)", self.layout.rec_path, initial_fill)
        self.index_path = image_index_path(self.layout, cache_dir)
        device_id = None
        if self.device.type == "cuda":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.pipeline = build_pipeline(self.layout.rec_path, self.index_path, self.batch_size, self.rank,
                                       self.world_size, int(seed), device_id, num_threads, int(input_size),
                                       _stored_size(self.layout), flip, dali_aug, shuffle, initial_fill)
        self.pipeline.build()
        self.iterator = DALIGenericIterator(self.pipeline, ["data", "label"], reader_name=READER_NAME,
                                            last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
        self.epoch = 0
        self.start_batch = 0
        self._fresh = True

    @classmethod
    def from_config(cls, cfg, rank, world_size, device):
        get = cfg.get
        return cls(cfg.rec, int(cfg.batch_size), device, rank, world_size, int(get("seed", 2048) or 0),
                   num_threads=max(1, int(get("num_workers", 2) or 2)), input_size=int(get("input_size", 112) or 112),
                   flip=bool(get("flip", True)), dali_aug=bool(get("dali_aug", False)),
                   num_classes=get("num_classes"))

    @property
    def num_samples(self):
        return len(self.layout)

    @property
    def labels(self):
        return self.layout.labels

    @property
    def bad_records(self):
        return 0

    def __len__(self):
        return self.batches_per_epoch

    def set_epoch(self, epoch, start_batch=0):
        """DALI shuffles internally; a resumed epoch skips `start_batch` batches (same count, not the same
        samples as the interrupted run)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ConfigError(f"start batch {start_batch} outside the epoch ({self.batches_per_epoch} batches)")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def reset(self):
        self.iterator.reset()

    def __iter__(self):
        if not self._fresh:
            self.iterator.reset()
        self._fresh = False
        for i, out in enumerate(self.iterator):
            if i < self.start_batch:
                continue
            if i >= self.batches_per_epoch:
                continue  # drain the extra batch of a larger shard so every rank yields the same count
            data = out[0]
            images = data["data"].to(self.device, non_blocking=True)
            labels = data["label"].to(self.device, non_blocking=True).long().view(-1)
            yield Batch(images, labels, None, None)
