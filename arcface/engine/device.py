"""Which device a process trains on, and the seeding of the global random generators.

Shared by the trainer and by tools that run a network outside training (teacher cache, evaluation), so that
they choose the device the same way.
"""
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
        return torch.device("cuda", D.get_local_rank())
    return torch.device("cpu")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
