"""The `kd` config section: its keys, defaults and meanings (the single source for validation and docs)."""
from easydict import EasyDict as edict

from arcface.config import unknown_key_error

KD_KEYS = {
    "enabled": (False, "switch the UKD plugin on"),
    "teacher_network": (None, "teacher backbone name for get_model, e.g. 'r100'"),
    "teacher_weights": (None, "teacher checkpoint (arcface_torch model.pt / backbone.pth), loaded strictly"),
    "teacher_embedding_size": (512, "teacher embedding dimension"),
    "teacher_network_kwargs": ({}, "extra get_model keyword arguments of the teacher (e.g. width for tiny runs)"),
    "teacher_check": (True, "evaluate the teacher on the .bin targets before step 0 and stop if it is poor"),
    "teacher_check_targets": (None, "names of <rec>/<name>.bin sets for the check (None: val_targets)"),
    "teacher_min_accuracy": (0.8, "the teacher sanity check fails below this verification accuracy"),
    "projector": ("auto", "student->teacher projector: auto (linear when the sizes differ), linear, or none"),
    "losses": ({"iled": {"weight": 10.0}, "rpsd": {"weight": 10.0}},
               "KD losses: {name: {weight, ramp_steps, <loss parameters>}}; see docs/plugins.md for each loss"),
}


def kd_defaults():
    return edict({k: v[0] for k, v in KD_KEYS.items()})


def resolve_kd_config(section):
    """Defaults merged with the user's section; an unknown key is a ConfigError naming the nearest one."""
    out = kd_defaults()
    for key, value in dict(section or {}).items():
        if key not in KD_KEYS:
            raise unknown_key_error(key, KD_KEYS, "config.kd")
        out[key] = value
    return out
