"""What the training loop hands to plugins, and the Plugin base class.

The engine knows nothing of distillation; plugins know nothing of data formats. How the hooks are called, in
which order and with what wrapping, is written once in plugin_driver.py.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch


@dataclass
class StepBatch:
    """One micro-step as a plugin sees it, after the student forward."""
    images: torch.Tensor            # [b, 3, H, W] normalised input exactly as the student saw it
    labels: torch.Tensor            # [b] int64 identity labels
    embeddings: torch.Tensor        # [b, d] raw (un-normalised) student embeddings, with gradient
    step: int                       # global optimizer step (0-based, before this update)
    index: Optional[torch.Tensor] = None   # [b] int64 dataset sample indices, when the loader gives them
    flip: Optional[torch.Tensor] = None    # [b] bool, whether the image was flipped


@dataclass
class TrainContext:
    """The objects a plugin may look at (not replace) when training starts."""
    cfg: Any
    backbone: torch.nn.Module       # the bare student backbone (not DDP-wrapped)
    device: torch.device
    rank: int
    world_size: int
    train_loader: Any = None
    output: str = ""
    schedule: Any = None            # the run's TrainSchedule (steps per epoch, total steps), None outside training


class Plugin:
    """Base class of engine plugins. Override only what you need; every hook has a harmless default.

    Order in one optimizer step: (after_forward per micro-step) -> backward -> optimizer -> after_step.
    A plugin that owns a config section sets `config_section` (an arcface.engine.plugins.ConfigSection); the
    loader then resolves `cfg.<key>` with its defaults and passes it through `validate_section`.
    """
    name = "plugin"
    config_section = None

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def validate_section(cls, section):
        """The resolved section (defaults merged, keys checked) -> the section to keep; raise ConfigError on a bad
        value. Called while the config loads, also when the plugin is off."""
        return section

    def trainable_modules(self) -> List[torch.nn.Module]:
        """Modules trained with the student (a projector, say): wrapped by DDP with it, optimised, clipped."""
        return []

    def bind_trainable(self, wrapped) -> None:
        """Receive trainable_modules() back, DDP-wrapped when distributed; call these in after_forward."""
        pass

    def before_training(self, ctx: TrainContext) -> None:
        pass

    def after_forward(self, batch: StepBatch) -> Dict[str, torch.Tensor]:
        """Named extra loss terms, each already weighted; they are added to the classification loss."""
        return {}

    def after_step(self, batch: StepBatch) -> None:
        pass

    def scalars(self) -> Dict[str, float]:
        """Named scalars for the log line and TensorBoard (averaged over the logging window by the engine)."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass
