"""How long a run is, in optimizer steps: computed once from the config and the loader, kept by the trainer.

Upstream writes these numbers into the user's config (cfg.total_step, ...); here they are an object of the
trainer, so a config always holds what the user wrote.
"""
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class TrainSchedule:
    batches_per_epoch: int       # loader batches per epoch on each rank
    gradient_acc: int            # micro-steps per optimizer step
    world_size: int
    batch_size: int              # per rank
    num_epoch: int
    warmup_epoch: float
    max_steps: int = 0           # 0: none

    @classmethod
    def from_config(cls, cfg, batches_per_epoch, world_size):
        if batches_per_epoch < cfg.gradient_acc:
            raise ConfigError(f"only {batches_per_epoch} batches per epoch per rank, fewer than gradient_acc="
                              f"{cfg.gradient_acc}; use a smaller batch_size or more data")
        return cls(batches_per_epoch=int(batches_per_epoch), gradient_acc=int(cfg.gradient_acc),
                   world_size=int(world_size), batch_size=int(cfg.batch_size), num_epoch=int(cfg.num_epoch),
                   warmup_epoch=float(cfg.warmup_epoch), max_steps=int(cfg.max_steps or 0))

    @property
    def steps_per_epoch(self):
        return self.batches_per_epoch // self.gradient_acc

    @property
    def batches_used_per_epoch(self):
        """A tail of fewer than gradient_acc batches is left out of every epoch."""
        return self.steps_per_epoch * self.gradient_acc

    @property
    def total_batch_size(self):
        return self.batch_size * self.world_size

    @property
    def warmup_step(self):
        return int(self.steps_per_epoch * max(self.warmup_epoch, 0))

    @property
    def total_step(self):
        epochs = int(self.steps_per_epoch * self.num_epoch)
        if not self.max_steps:
            return epochs
        return min(epochs, self.max_steps) if self.num_epoch else self.max_steps

    def describe(self):
        return (f"{self.steps_per_epoch} steps/epoch, {self.total_step} steps in total "
                f"({self.warmup_step} of warmup), global batch {self.total_batch_size}")
