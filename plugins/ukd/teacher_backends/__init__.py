"""Where the teacher's embeddings come from (kd.teacher_backend): see base.py. Importing the package registers
the three backends."""
from . import cache_backend, onnx_backend, torch_backend  # noqa: F401  (registers them)
from .base import (TEACHER_BACKENDS, TeacherBackend, build_teacher_backend, configured_teacher_file,
                   register_teacher_backend, teacher_precision, teacher_source)
from .onnx_backend import OnnxInputConverter, OnnxTeacher, OnnxTeacherEmbedder, build_onnx_teacher

__all__ = ["TEACHER_BACKENDS", "TeacherBackend", "build_teacher_backend", "configured_teacher_file",
           "register_teacher_backend", "teacher_precision", "teacher_source", "OnnxInputConverter", "OnnxTeacher",
           "OnnxTeacherEmbedder", "build_onnx_teacher"]
