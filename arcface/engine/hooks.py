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

    # ---- the classification head (Partial FC) ------------------------------------------------------------
    # `head` is this rank's arcface.partial_fc.PartialFC_V2: its `weight` holds only the rows of classes
    # [head.class_start, head.class_start + head.num_local), so whatever a plugin does to it stays sharded.

    def uses_head(self) -> bool:
        """Whether configure_head / before_head do anything; hosts that cannot offer them (the graft into
        upstream's train_v2.py runs upstream's Partial FC) refuse a plugin that says yes."""
        return type(self).configure_head is not Plugin.configure_head or \
            type(self).before_head is not Plugin.before_head

    def configure_head(self, head) -> None:
        """Once, after Partial FC is built and before the optimizer is: e.g. copy in class centres
        (`head.weight.data.copy_(rows)`), freeze them (`head.weight.requires_grad_(False)`: the optimizer then
        never updates them), or replace the margin (`head.margin_softmax = callable(cos, shard_labels) -> logits`)."""

    def before_head(self, head, batch: StepBatch) -> None:
        """Each micro-step, after after_forward and before the Partial FC forward: e.g. move the class centres of
        this rank's shard towards the teacher's embeddings, in place under torch.no_grad(). Collectives are
        allowed (every rank calls it); a plugin that needs the whole batch gathers it itself."""

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
