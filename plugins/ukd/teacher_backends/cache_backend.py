"""Teacher embeddings read from a tools/cache_teacher.py file (kd.teacher_cache) by (sample index, flip)."""
import logging
import time

from arcface.engine.precision import autocast_for
from arcface.errors import ConfigError, DataError

from ..cache.file_format import dataset_identity, file_sha256, open_for_training
from ..teacher import build_teacher
from .base import (TeacherBackend, configured_teacher_file, register_teacher_backend, teacher_precision,
                   teacher_source)
from .onnx_backend import OnnxTeacherEmbedder, build_onnx_teacher

log = logging.getLogger("arcface")


@register_teacher_backend("cache")
class CacheTeacherBackend(TeacherBackend):
    """Teacher embeddings read from a tools/cache_teacher.py file by (sample index, flip).

    Start-up refuses (ConfigError) a cache that is incomplete or does not match the data set, input size,
    embedding size or the configured teacher file, and loaders that cannot say which sample and view a row
    is (DALI). A loader that yields index=None anyway is refused on the first batch. A cache whose bytes do not
    match their checksums (checked at start-up) or a damaged row (checked on every lookup) is a DataError
    naming the chunk or sample, before it can turn into a NaN loss.
    """
    def __init__(self, kd, cfg, ctx):
        path = kd.get("teacher_cache")
        if not path:
            raise ConfigError("kd.teacher_backend='cache' needs kd.teacher_cache (a file written by "
                              "tools/cache_teacher.py)")
        if cfg.get("dali") or cfg.get("dali_aug"):
            raise ConfigError(f"kd.teacher_backend='cache' cannot be used with dali={cfg.get('dali')} / dali_aug="
                              f"{cfg.get('dali_aug')}: the DALI loader does not report sample indices and its "
                              "augmentations change the images the cache was computed from; set dali=False")
        self.kd, self.cfg, self.device = kd, cfg, ctx.device
        self.path = str(path)
        self.dataset = dataset_identity(cfg.rec, what="kd.teacher_backend='cache' needs cfg.rec to be",
                                        skip_bad_records=bool(cfg.get("skip_bad_records")))
        teacher_file = configured_teacher_file(kd)
        teacher_sha = file_sha256(teacher_file) if teacher_file else None
        self.cache = open_for_training(self.path, self.dataset, int(cfg.input_size),
                                       int(kd.teacher_embedding_size), teacher_file, teacher_sha)
        built = self.cache.header["teacher"]["precision"]
        live = teacher_precision(teacher_source(kd), bool(cfg.get("fp16")), ctx.device)
        if built != live:
            log.warning(f"UKD: kd.teacher_cache {self.path} was computed in {built}; a live teacher in this run "
                        f"would run in {live} (differences of that precision's rounding)")
        loader_count = getattr(ctx.train_loader, "num_samples", None)
        if isinstance(loader_count, int) and loader_count != self.cache.num_images:
            raise ConfigError(f"kd.teacher_cache {self.path} holds {self.cache.num_images} samples but the training "
                              f"loader has {loader_count}")
        self.teacher_file = teacher_file
        self.description = f"cache {self.path} ({self.cache.describe_teacher()})"

    def __call__(self, images, index=None, flip=None):
        start = time.perf_counter()
        if index is None or flip is None:
            missing = "index" if index is None else "flip"
            raise ConfigError(f"kd.teacher_backend='cache': the training loader gave {missing}=None, so the cached "
                              "teacher embedding of a sample cannot be found; use the PyTorch RecordIO loader "
                              "(dali=False) or a loader whose batches carry index and flip")
        if index.shape[0] != images.shape[0] or flip.shape[0] != images.shape[0]:
            raise DataError(f"kd.teacher_backend='cache': batch of {images.shape[0]} images with "
                            f"{index.shape[0]} indices and {flip.shape[0]} flips")
        rows = self.cache.lookup(index.detach().cpu().numpy(), flip.detach().cpu().numpy())
        out = rows.to(images.device, non_blocking=True)
        self.last_ms = (time.perf_counter() - start) * 1000
        return out

    def embedder(self):
        """The configured teacher file's embedder (it was checked to be the cached teacher), else None."""
        if not self.teacher_file:
            return None
        if teacher_source(self.kd) == "onnx":
            return OnnxTeacherEmbedder(build_onnx_teacher(self.kd, self.cfg.input_size, self.device))
        from arcface.eval.embedder import TorchEmbedder
        teacher = build_teacher(self.kd, autocast_for(bool(self.cfg.fp16), self.device)[0], self.device,
                                self.cfg.input_size)
        return TorchEmbedder(teacher.backbone, self.device)
