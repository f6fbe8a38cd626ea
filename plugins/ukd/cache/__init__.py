"""The teacher embedding cache: the file format (file_format.py) and its distributed build (build.py)."""
from .build import build_teacher_cache, teacher_identity, write_rows
from .file_format import (HEADER_BYTES, CacheFile, dataset_identity, file_sha256, open_for_training, progress_files,
                     read_header, read_progress, write_progress)

__all__ = ["build_teacher_cache", "teacher_identity", "write_rows", "HEADER_BYTES", "CacheFile", "dataset_identity",
           "file_sha256", "open_for_training", "progress_files", "read_header", "read_progress", "write_progress"]
