"""How plugins are driven through a training run: written once, used by our trainer and by the graft into a
user's own arcface_torch train_v2.py (patches/ukd_graft.py), so both call the same hooks in the same order.

    set-up       attach(wrap): each plugin's trainable_modules() -> wrap (DDP when distributed) -> bind_trainable;
                 the returned parameters join the student's optimizer group and gradient clipping
    head         configure_head(pfc): once, after Partial FC is built, before the optimizer (plugins whose
                 uses_head() is true only)
    start        before_training(ctx), after the model, optimizer and resume exist
    micro-step   loss_terms(StepBatch): every plugin's after_forward terms (already weighted), added to the
                 classification loss before backward; names must not collide; then before_head(pfc, StepBatch),
                 then the Partial FC forward
    step         after_step(StepBatch of the last micro-step), once per optimizer step, after the update
    logging      TermWindow: the terms averaged over the micro-steps of a step (or any window), named
                 `loss/<term>` (`loss/cls` is the margin softmax); then scalars() of every plugin
    checkpoint   state_dict() {plugin name: state} / load_state_dict(states)
    teardown     detach(): bind_trainable([]) so that no DDP wrapper outlives the process group
"""
from typing import Callable, Dict, List

import torch

from ..errors import CheckpointError, ConfigError
from .hooks import StepBatch, TrainContext

CLS_TERM = "cls"  # the classification (margin softmax) loss in a window of terms


class PluginDriver:
    def __init__(self, plugins):
        self.plugins = list(plugins)
        self.trainable: List[torch.nn.Module] = []   # as wrapped, for no_sync and teardown

    def __bool__(self):
        return bool(self.plugins)

    def __iter__(self):
        return iter(self.plugins)

    def __len__(self):
        return len(self.plugins)

    def __getitem__(self, i):
        return self.plugins[i]

    def attach(self, wrap: Callable[[torch.nn.Module], torch.nn.Module], device) -> List[torch.nn.Parameter]:
        """Move each plugin's trainable modules to the device, wrap them, hand them back; their parameters."""
        params = []
        for plugin in self.plugins:
            modules = [m.to(device) for m in plugin.trainable_modules()]
            wrapped = [wrap(m) for m in modules]
            plugin.bind_trainable(wrapped)
            self.trainable += wrapped
            for m in modules:
                params += [p for p in m.parameters() if p.requires_grad]
        return params

    def before_training(self, ctx: TrainContext):
        for plugin in self.plugins:
            plugin.before_training(ctx)

    @property
    def head_users(self):
        return [plugin for plugin in self.plugins if plugin.uses_head()]

    def configure_head(self, head):
        for plugin in self.head_users:
            plugin.configure_head(head)

    def before_head(self, head, batch: StepBatch):
        for plugin in self.head_users:
            plugin.before_head(head, batch)

    def loss_terms(self, batch: StepBatch) -> Dict[str, torch.Tensor]:
        terms = {}
        for plugin in self.plugins:
            for name, value in plugin.after_forward(batch).items():
                if name == CLS_TERM or name in terms:
                    raise ConfigError(f"plugin '{plugin.name}' returns a loss term '{name}' that another term "
                                      "already uses; give it another name")
                terms[name] = value
        return terms

    def after_step(self, batch: StepBatch):
        for plugin in self.plugins:
            plugin.after_step(batch)

    def scalars(self) -> Dict[str, float]:
        out = {}
        for plugin in self.plugins:
            out.update(plugin.scalars())
        return out

    def state_dict(self):
        return {plugin.name: plugin.state_dict() for plugin in self.plugins}

    def load_state_dict(self, states, where="the checkpoint"):
        for plugin in self.plugins:
            if plugin.name not in states:
                continue
            try:
                plugin.load_state_dict(states[plugin.name])
            except (RuntimeError, KeyError, ValueError) as exc:
                raise CheckpointError(f"{where}: the state of plugin '{plugin.name}' does not fit this config: "
                                      f"{exc}") from exc

    def detach(self):
        self.trainable = []
        for plugin in self.plugins:
            plugin.bind_trainable([])


class TermWindow:
    """Loss terms averaged over a window of micro-steps, as floats, and their log names."""

    def __init__(self):
        self._sums: Dict[str, float] = {}
        self.count = 0

    def add(self, terms: Dict[str, torch.Tensor]):
        for name, value in terms.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value.detach())
        self.count += 1

    def take(self):
        """{term: mean over the window}, then empty the window."""
        means = {name: value / max(self.count, 1) for name, value in self._sums.items()}
        self._sums, self.count = {}, 0
        return means


def log_scalars(means):
    """The window's means as log scalars: `loss/total` and `loss/<term>` beside the classification loss, which the
    log line prints as `Loss` (nothing extra when it is the only term: a plain run logs as upstream)."""
    if len(means) <= 1:
        return {}
    named = {f"loss/{name}": value for name, value in means.items()}
    named["loss/total"] = sum(means.values())
    return named
