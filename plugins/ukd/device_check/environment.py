"""Group 'environment': what the machine and its libraries are (every report starts with it)."""
import os
import platform
import subprocess

from .core import check


def _version(module, distribution=None):
    try:
        mod = __import__(module, fromlist=["__version__"])
        if hasattr(mod, "__version__"):
            return mod.__version__
        import importlib.metadata
        return importlib.metadata.version(distribution or module)
    except Exception as exc:  # noqa: BLE001 - a broken install is a finding, not a crash
        return f"not importable ({type(exc).__name__}: {str(exc)[:80]})"


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


def _driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


@check("environment", needs_cuda=False, budget_s=30, quick=True,
       what="GPU name and memory, driver, CUDA, cuDNN, NCCL, torch, DALI and onnxruntime versions, and a first "
            "CUDA computation.")
def environment(ctx, rec):
    import numpy as np
    import torch
    rec.update(python=platform.python_version(), platform=platform.platform(), cpu=_cpu_model(),
               cpu_cores=os.cpu_count(), memory_gib=_memory_gib(), torch=torch.__version__,
               torch_threads=torch.get_num_threads(), numpy=np.__version__,
               load_average_1min=round(os.getloadavg()[0], 2))
    rec["cuda_available"] = torch.cuda.is_available()
    rec["cuda_runtime"] = torch.version.cuda
    rec["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        nccl = torch.cuda.nccl.version()
        rec["nccl"] = ".".join(str(v) for v in nccl) if isinstance(nccl, tuple) else nccl
    except Exception as exc:  # noqa: BLE001 - CPU builds have no NCCL
        rec["nccl"] = f"none ({type(exc).__name__})"
    rec["nccl_backend_available"] = bool(torch.distributed.is_available() and torch.distributed.is_nccl_available())
    rec["dali"] = _version("nvidia.dali")
    rec["onnxruntime"] = _version("onnxruntime")
    try:
        import onnxruntime
        rec["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception:  # noqa: BLE001
        rec["onnxruntime_providers"] = []
    rec["easydict"] = _version("easydict")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        rec["gpu_count"] = count
        for i in range(count):
            props = torch.cuda.get_device_properties(i)
            rec[f"gpu{i}"] = f"{props.name}, {props.total_memory / 2 ** 30:.1f} GiB, capability " \
                             f"{props.major}.{props.minor}, {props.multi_processor_count} SMs"
        rec["driver"] = _driver()
        rec["bf16_supported"] = torch.cuda.is_bf16_supported()
        x = torch.randn(1024, 1024, device="cuda")
        y = (x @ x).sum()  # a first kernel: fails here, with a clear message, if CUDA is unusable
        rec.expect(bool(torch.isfinite(y)), "a 1024x1024 matrix product on the GPU is not finite")
        rec.summary = f"{torch.cuda.get_device_name(0)} x{count}, CUDA {torch.version.cuda}, cuDNN {rec['cudnn']}, " \
                      f"NCCL {rec['nccl']}, torch {torch.__version__}, DALI {rec['dali']}"
    else:
        rec["gpu_count"] = 0
        rec.summary = f"no CUDA device; torch {torch.__version__}, {os.cpu_count()} cores, DALI {rec['dali']}, " \
                      f"onnxruntime {rec['onnxruntime']}"
    rec.expect(torch.cuda.is_available() == ctx.cuda, "torch.cuda.is_available() changed during the run")
