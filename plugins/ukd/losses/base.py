"""Base class of KD losses: one subclass per file, registered with @register_kd_loss("name")."""
import torch

from ..batch import KDBatch, KDOutput


class KDLoss(torch.nn.Module):
    """Contract:

    - forward(batch: KDBatch) -> KDOutput with an unweighted scalar loss and float statistics.
    - Distributed rule: each rank returns a loss on its local anchors such that the DDP average of the
      per-rank gradients equals the gradient of the same loss computed on the whole global batch in one
      process (tests check 2 processes against 1). Anything mined over the batch is mined over the
      all-gathered (detached) batch.
    - after_step(batch): update state (e.g. a memory bank) after the optimizer step; identical on every rank.
    - check(global_batch_size, pk_sampler): raise ConfigError at start-up for settings that cannot work.
    - State lives in registered buffers so that state_dict()/load_state_dict() save and restore it.
    """
    name = "kd_loss"

    def forward(self, batch: KDBatch) -> KDOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_step(self, batch: KDBatch) -> None:
        pass

    def check(self, global_batch_size: int, pk_sampler: bool) -> None:
        pass
