"""The weighted sum of KD terms built from the config, and the formula it prints at start-up.

spec maps a term name to {'weight': float, 'ramp_steps': int (optional), 'loss': registered name
(optional, default: the term name), **the loss's own parameters}, e.g.

    {"iled": {"weight": 10.0, "ratio": 0.25},
     "rpsd": {"weight": 10.0, "ramp_steps": 2000, "bank": 16384, "k_neg": 256}}

A 'loss' key lets one loss appear twice with different parameters (ablations): {"rpsd_kl": {"loss": "rpsd",
"form": "kl", "weight": 1.0}}.

A 'scale' key makes a term's weight scale-free, so that one weight means the same thing for every loss:
'loss' divides the term by a running estimate of its own value, 'grad' by a running estimate of the size of its
gradient at the student embedding (per-sample RMS norm over the global batch); 'none' (default) leaves it as is.
"""
import contextlib
import inspect
import math

import torch

from arcface.engine.distributed import all_reduce_sum
from arcface.errors import ConfigError
from .batch import KDBatch
from .losses.registry import build_kd_loss, kd_loss_class

_RESERVED = ("weight", "ramp_steps", "loss", "scale")
SCALES = ("none", "loss", "grad")
SCALE_MOMENTUM = 0.99   # the running estimates average over about the last 100 steps


class RunningScale(torch.nn.Module):
    """A bias-corrected EMA of a positive statistic (buffers, so it is saved with the checkpoint)."""

    def __init__(self, momentum=SCALE_MOMENTUM):
        super().__init__()
        self.momentum = float(momentum)
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def observe(self, value):
        self.mean.mul_(self.momentum).add_((1.0 - self.momentum) * float(value))
        self.steps += 1

    def value(self):
        """The estimate; 1 before the first observation."""
        steps = int(self.steps)
        if steps == 0:
            return 1.0
        return float(self.mean) / (1.0 - self.momentum ** steps)


class KDComposer(torch.nn.Module):
    """sum_k weight_k(step) * L_k / scale_k, with weight_k(step) = weight_k * min(1, step / ramp_steps_k) and
    scale_k = 1 ('none'), the running mean of L_k ('loss') or of its per-sample gradient norm ('grad').

    A torch Module, so `.to(device)` moves the losses' buffers (memory banks) and `state_dict()` saves them.
    The running scales are estimated from global-batch values (summed over ranks) and are detached, so every
    rank divides by the same number and the distributed rule of each loss still holds.
    """

    def __init__(self, spec, where="kd.losses"):
        super().__init__()
        if not isinstance(spec, dict) or not spec:
            raise ConfigError(f"{where} must be a non-empty dict of KD terms, e.g. {{'iled': {{'weight': 10.0}}}}, "
                              f"got {spec!r}")
        self.where = where
        self.terms = torch.nn.ModuleDict()
        self.scalers = torch.nn.ModuleDict()   # only terms with scale != 'none' (old checkpoints stay loadable)
        self.weights, self.ramps, self.loss_names, self.params, self.scales = {}, {}, {}, {}, {}
        for key, entry in spec.items():
            path = f"{where}.{key}"
            if not isinstance(key, str) or not key.isidentifier():
                raise ConfigError(f"{path}: a KD term name must be a plain identifier, got {key!r}")
            if not isinstance(entry, dict):
                raise ConfigError(f"{path} must be a dict with 'weight' and the loss's parameters, got {entry!r}")
            entry = dict(entry)
            if "weight" not in entry:
                raise ConfigError(f"{path}: missing 'weight' (the term's factor in the total loss)")
            weight = _number(entry.pop("weight"), f"{path}.weight", float)
            ramp = _number(entry.pop("ramp_steps", 0), f"{path}.ramp_steps", int)
            if weight < 0 or ramp < 0:
                raise ConfigError(f"{path}: weight and ramp_steps must be >= 0, got {weight} and {ramp}")
            loss_name = entry.pop("loss", key)
            scale = entry.pop("scale", "none")
            if scale not in SCALES:
                raise ConfigError(f"{path}.scale must be one of {SCALES}, got {scale!r}")
            try:
                term = build_kd_loss(loss_name, **entry)
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from err
            if hasattr(self.terms, key):
                raise ConfigError(f"{path}: '{key}' is a reserved name, call the term something else "
                                  f"and set 'loss': '{loss_name}'")
            self.terms[key] = term
            self.weights[key], self.ramps[key], self.loss_names[key] = weight, ramp, loss_name
            self.scales[key] = scale
            if scale != "none":
                self.scalers[key] = RunningScale()
            self.params[key] = _effective_params(kd_loss_class(loss_name), entry)

    def weight_at(self, key, step):
        ramp = self.ramps[key]
        return self.weights[key] * (min(1.0, step / ramp) if ramp > 0 else 1.0)

    def formula(self):
        """'L = L_cls + 10.0 * iled(ratio=0.25, ...) + ...' for the start-up log."""
        parts = ["L_cls"]
        for key in self.terms:
            args = ", ".join(f"{name}={value!r}" for name, value in self.params[key].items())
            call = f"{self.loss_names[key]}({args})"
            if key != self.loss_names[key]:
                call = f"{key}:{call}"
            factor = repr(self.weights[key])
            if self.ramps[key]:
                factor += f" * min(1, step/{self.ramps[key]})"
            divisor = {"none": "", "loss": f" / ema({key})", "grad": f" / ema(|grad {key}|)"}[self.scales[key]]
            parts.append(f"{factor} * {call}{divisor}")
        return "L = " + " + ".join(parts)

    def forward(self, batch: KDBatch):
        """(name -> weighted loss tensor, float statistics: each term's unweighted value, weight and stats)."""
        losses, stats = {}, {}
        device_type = batch.student.device.type
        # KD terms compare small differences of cosines: keep them out of fp16 autocast.
        no_autocast = torch.autocast(device_type, enabled=False) if device_type in ("cuda", "cpu") \
            else contextlib.nullcontext()
        with no_autocast:
            for key, term in self.terms.items():
                out = term(batch)
                weight = self.weight_at(key, batch.step)
                value = out.loss
                if key in self.scalers:
                    scale = self._rescale(key, out.loss, batch)
                    value = value / scale
                    stats[f"{key}/scale"] = scale
                losses[key] = weight * value
                stats[key] = float(out.loss.detach())
                stats[f"{key}/weight"] = weight
                for name, value in out.stats.items():
                    stats[f"{key}/{name}"] = float(value)
        return losses, stats

    def _rescale(self, key, loss, batch):
        """Fold this step's global statistic into the term's running scale; the scale to divide by."""
        scaler = self.scalers[key]
        with torch.no_grad():
            if self.scales[key] == "loss":
                # each rank's value averages to the global-batch loss (the losses' distributed rule)
                total = loss.detach().double().reshape(1).clone()
                if batch.world_size > 1:
                    all_reduce_sum(total)
                scaler.observe(float(total) / batch.world_size)
        if self.scales[key] == "grad" and batch.student.requires_grad and torch.is_grad_enabled():
            grad, = torch.autograd.grad(loss, batch.student, retain_graph=True, allow_unused=True)
            if grad is not None:
                # a rank's rows hold world_size x their share of the global-batch gradient
                sq = grad.detach().double().pow(2).sum().reshape(1)
                if batch.world_size > 1:
                    all_reduce_sum(sq)
                scaler.observe(math.sqrt(batch.global_size * float(sq)) / batch.world_size)
        return max(scaler.value(), 1e-12)

    def bind_training(self, ctx):
        """Hand the run's TrainContext (schedule, loader, cfg) to every term, once at start-up."""
        for key, term in self.terms.items():
            try:
                term.bind_training(ctx)
            except ConfigError as err:
                raise ConfigError(f"{self.where}.{key}: {err}") from err

    def after_step(self, batch: KDBatch):
        for term in self.terms.values():
            term.after_step(batch)

    def head_terms(self):
        return [term for term in self.terms.values() if term.uses_head]

    def configure_head(self, head):
        for term in self.head_terms():
            term.configure_head(head)

    def before_head(self, head, batch: KDBatch):
        for term in self.head_terms():
            term.before_head(head, batch)

    def check(self, global_batch_size, pk_sampler):
        for key, term in self.terms.items():
            try:
                term.check(global_batch_size, pk_sampler)
            except ConfigError as err:
                raise ConfigError(f"{self.where}.{key}: {err}") from err

    def extra_repr(self):
        return self.formula()


def _number(value, path, kind):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ConfigError(f"{path} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    return kind(value)


def _effective_params(cls, given):
    """Every constructor parameter with the value in use (the given one, else the default)."""
    params = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        params[name] = given.get(name, p.default)
    return params
