"""A small plugin that exercises every hook point: a feature-norm regulariser.

Adds weight * mean((||e|| - target)^2) to the loss, counts the steps it has seen (saved in checkpoints),
and logs the mean embedding norm. Switch it on with `config.plugins = [{"name": "feature_norm", "weight": 0.01}]`.
"""
from arcface.engine.plugins import Plugin, register_plugin


@register_plugin("feature_norm")
class FeatureNormPlugin(Plugin):
    def __init__(self, cfg, weight=0.01, target=20.0):
        super().__init__(cfg)
        self.weight = float(weight)
        self.target = float(target)
        self.steps_seen = 0
        self._norm_sum = 0.0
        self._norm_count = 0

    def after_forward(self, batch):
        norms = batch.embeddings.float().norm(dim=1)
        self._norm_sum += float(norms.detach().mean())
        self._norm_count += 1
        return {"feature_norm": self.weight * ((norms - self.target) ** 2).mean()}

    def after_step(self, batch):
        self.steps_seen += 1

    def scalars(self):
        if not self._norm_count:
            return {}
        out = {"feature_norm/mean_norm": self._norm_sum / self._norm_count}
        self._norm_sum, self._norm_count = 0.0, 0
        return out

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        self.steps_seen = int(state["steps_seen"])


__all__ = ["FeatureNormPlugin"]
