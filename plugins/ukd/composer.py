"""The weighted sum of KD terms built from the config, and the formula it prints at start-up.

spec maps a term name to {'weight': float, 'ramp_steps': int (optional), 'loss': registered name
(optional, default: the term name), **the loss's own parameters}, e.g.

    {"iled": {"weight": 10.0, "ratio": 0.25},
     "rpsd": {"weight": 10.0, "ramp_steps": 2000, "bank": 16384, "k_neg": 256}}

A 'loss' key lets one loss appear twice with different parameters (ablations): {"rpsd_kl": {"loss": "rpsd",
"form": "kl", "weight": 1.0}}.
"""
import contextlib
import inspect

import torch

from arcface.errors import ConfigError
from .batch import KDBatch
from .losses.registry import build_kd_loss, kd_loss_class

_RESERVED = ("weight", "ramp_steps", "loss")


class KDComposer(torch.nn.Module):
    """sum_k weight_k(step) * L_k, with weight_k(step) = weight_k * min(1, step / ramp_steps_k).

    A torch Module, so `.to(device)` moves the losses' buffers (memory banks) and `state_dict()` saves them.
    """

    def __init__(self, spec, where="kd.losses"):
        super().__init__()
        if not isinstance(spec, dict) or not spec:
            raise ConfigError(f"{where} must be a non-empty dict of KD terms, e.g. {{'iled': {{'weight': 10.0}}}}, "
                              f"got {spec!r}")
        self.where = where
        self.terms = torch.nn.ModuleDict()
        self.weights, self.ramps, self.loss_names, self.params = {}, {}, {}, {}
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
            try:
                term = build_kd_loss(loss_name, **entry)
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from err
            if hasattr(self.terms, key):
                raise ConfigError(f"{path}: '{key}' is a reserved name, call the term something else "
                                  f"and set 'loss': '{loss_name}'")
            self.terms[key] = term
            self.weights[key], self.ramps[key], self.loss_names[key] = weight, ramp, loss_name
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
            parts.append(f"{factor} * {call}")
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
                losses[key] = weight * out.loss
                stats[key] = float(out.loss.detach())
                stats[f"{key}/weight"] = weight
                for name, value in out.stats.items():
                    stats[f"{key}/{name}"] = float(value)
        return losses, stats

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
