"""Which device a process trains on, and the seeding of the global random generators.

Shared by the trainer and by tools that run a network outside training (teacher cache, evaluation), so that
they choose the device the same way.
"""
import os
import random

import numpy as np
import torch

from ..errors import ConfigError
from . import distributed as D


def pick_device(cfg):
    """cfg.device 'cuda' / 'cpu' / 'auto' (CUDA when present); the local rank's GPU on CUDA."""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but CUDA is not available")
        local, count = D.get_local_rank(), torch.cuda.device_count()
        if local >= count:
            raise ConfigError(f"local rank {local} has no GPU of its own: this machine shows {count} "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at "
                              f"most {count} processes per machine (torchrun --nproc_per_node={count})")
        return torch.device("cuda", local)
    return torch.device("cpu")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def cpu_count():
    """Cores this process may run on (the affinity mask, which containers and taskset restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(num_threads, local_world_size):
    """Set torch's CPU threads for this process and return (threads, why), for the log.

    An explicit choice wins: cfg.num_threads, else OMP_NUM_THREADS from the environment (torchrun sets it to 1
    for several processes). Otherwise each of the local processes gets its share of the cores. DataLoader
    workers run one thread each (arcface.data.loader.seed_worker): with OpenMP's default of one thread per core
    in every process, a small CPU run on a shared 2-core machine trained about 30x slower.
    """
    if num_threads:
        torch.set_num_threads(int(num_threads))
        return int(num_threads), "num_threads in the config"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    threads = max(1, cpu_count() // max(1, int(local_world_size)))
    torch.set_num_threads(threads)
    return threads, f"{cpu_count()} cores / {local_world_size} local processes"

