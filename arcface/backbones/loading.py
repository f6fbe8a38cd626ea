"""Load backbone weights from insightface-style files, failing loudly on any mismatch.

Accepted: `model.pt` / `backbone.pth` (a plain state dict, what arcface_torch writes and the model zoo
ships), a training checkpoint holding `state_dict_backbone` (`checkpoint_gpu_<rank>.pt`, ours and
upstream's; ours carries numpy RNG states, read with numpy's array rebuilders allowed and nothing else), or
an in-memory state dict. Files are read with torch.load(weights_only=True): a weights file never runs code. Keys saved through DistributedDataParallel (`module.`) or
torch.compile (`_orig_mod.`) are accepted. A missing file, a file that is not a PyTorch checkpoint,
missing / unexpected keys or a shape mismatch raise CheckpointError naming the file and the network.
"""
import logging
import os
import pickle
import zipfile
from collections import namedtuple
from collections.abc import Mapping

import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SHOWN = 5  # keys listed per kind of problem; the rest are counted

BackboneState = namedtuple("BackboneState", ["source", "state"])


def read_backbone_state(path_or_state_dict, what="backbone"):
    """The backbone's state dict of a file or dict (checkpoint unwrapped, wrapper prefixes stripped), with the
    name of where it came from; pass it to load_backbone_weights to look at a file before loading it once."""
    if isinstance(path_or_state_dict, BackboneState):
        return path_or_state_dict
    source, loaded = _read(path_or_state_dict, what)
    return BackboneState(source, _strip_wrappers(_backbone_part(loaded, source, what)))


def load_backbone_weights(model, path_or_state_dict, strict=True, what="backbone"):
    """Copy weights into `model`; returns torch's (missing_keys, unexpected_keys) of the final load.

    strict=False tolerates missing and unexpected keys, never a shape mismatch. A missing BatchNorm
    `num_batches_tracked` (files converted from other frameworks) is never an error: it is a counter,
    not a weight.
    """
    model = _unwrap_model(model)
    source, state = read_backbone_state(path_or_state_dict, what)
    network = getattr(model, "network", type(model).__name__)

    expected = model.state_dict()
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
                  for k in state if k in expected and isinstance(state[k], torch.Tensor)
                  and state[k].shape != expected[k].shape]

    problems = []
    if not_tensors:
        problems.append(_listing("entries that are not tensors", not_tensors))
    if mismatched:
        problems.append(_listing("shape mismatches", mismatched))
    if strict and missing:
        problems.append(_listing("missing keys", missing))
    if strict and unexpected:
        problems.append(_listing("unexpected keys", unexpected))
    if problems:
        raise CheckpointError(f"cannot load {what} weights from {source} into {network}: "
                              + "; ".join(problems) + _hint(expected, state, mismatched))
    usable = {k: v for k, v in state.items() if k in expected}
    return model.load_state_dict(usable, strict=False)


def _unwrap_model(model):
    """Load into the network itself when given its DistributedDataParallel / DataParallel / compiled wrapper."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _read(path_or_state_dict, what):
    if isinstance(path_or_state_dict, Mapping):
        return "<in-memory state dict>", path_or_state_dict
    path = os.fspath(path_or_state_dict)
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} weights file {path} does not exist"
                              + (" (it is a directory)" if os.path.isdir(path) else ""))
    if not _looks_like_torch_save(path):
        raise CheckpointError(f"{what} weights file {path} is not a PyTorch checkpoint (neither the zip format "
                              f"of torch.save nor the legacy pickle format)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        loaded = _read_with_numpy_arrays(path, what, err)
    except Exception as err:  # truncated or corrupt files: RuntimeError, EOFError, ...
        raise CheckpointError(f"{what} weights file {path} is not a readable PyTorch checkpoint "
                              f"({type(err).__name__}: {_gist(err)})") from err
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{what} weights file {path} holds a {type(loaded).__name__}, "
                              f"expected a state dict or a dict with 'state_dict_backbone'")
    return path, loaded


def _read_with_numpy_arrays(path, what, err):
    """A file that weights_only refused: when the only other objects in it are numpy arrays (the RNG states of
    our checkpoint_gpu_<rank>.pt), read it with numpy's array rebuilders allowed as well - data, not code - so a
    training checkpoint gives its state_dict_backbone; anything else is refused with what it is and what to use."""
    unsafe = _unsafe_globals(path)
    allowed = _numpy_array_globals(unsafe) if unsafe else None
    if allowed is not None:
        try:
            with torch.serialization.safe_globals(allowed):
                loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as again:
            raise CheckpointError(f"{what} weights file {path} is not a readable PyTorch checkpoint "
                                  f"({type(again).__name__}: {_gist(again)})") from again
        if isinstance(loaded, Mapping) and "state_dict_backbone" in loaded:
            log.info("%s weights: the backbone of the training checkpoint %s (state_dict_backbone)", what, path)
        return loaded
    objects = f" ({', '.join(unsafe)})" if unsafe else f" ({_gist(err)})"
    if _names_backbone_key(path):
        raise CheckpointError(
            f"{what} weights file {path} is a training checkpoint (checkpoint_gpu_<rank>.pt): the weights wanted are "
            f"its state_dict_backbone, which the run also wrote as model.pt next to it - give that file. This one "
            f"holds Python objects besides tensors and numpy arrays{objects}, which are not unpickled because that "
            f"could run code; if you trust it, torch.load(path, weights_only=False)['state_dict_backbone'] gives "
            f"the same weights") from err
    raise CheckpointError(
        f"{what} weights file {path} holds pickled Python objects, not just tensors, so it is not loaded "
        f"(a whole nn.Module saved with torch.save(model)?). If you trust it, load it yourself with "
        f"torch.load(..., weights_only=False) and pass its state_dict().{objects}") from err


def _unsafe_globals(path):
    """Dotted names of the globals weights_only refuses in a zip-format file, or None when that is unknown."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None or not zipfile.is_zipfile(path):
        return None
    try:
        return sorted(finder(path))
    except Exception:
        return None


def _numpy_array_globals(names):
    """The objects behind `names` when every one is part of pickled numpy arrays of plain numbers, else None."""
    import numpy as np

    rebuilders = {"numpy.core.multiarray._reconstruct": np.empty(0).__reduce__()[0],
                  "numpy._core.multiarray._reconstruct": np.empty(0).__reduce__()[0],
                  "numpy.core.multiarray.scalar": np.float64(0).__reduce__()[0],
                  "numpy._core.multiarray.scalar": np.float64(0).__reduce__()[0],
                  "numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    # a dtype is rebuilt as an instance of its class (numpy.dtypes.UInt32DType, ...), which the scan for globals
    # does not list: every plain-number dtype class comes with numpy.dtype (no object, void or datetime dtypes)
    numeric = {f"numpy.dtypes.{type(np.dtype(c)).__name__}": type(np.dtype(c)) for c in np.typecodes["All"]
               if c not in "OVMm"}
    if any(name not in rebuilders and name not in numeric for name in names):
        return None
    return [rebuilders.get(name) or numeric[name] for name in names] + list(numeric.values())


def _names_backbone_key(path, limit=1 << 24):
    """Whether the file's pickle holds the string 'state_dict_backbone' (read as bytes, nothing unpickled)."""
    needle = b"state_dict_backbone"
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                return name is not None and needle in archive.read(name)[:limit]
        with open(path, "rb") as handle:
            return needle in handle.read(limit)
    except (OSError, zipfile.BadZipFile):
        return False


def _looks_like_torch_save(path):
    with open(path, "rb") as handle:
        magic = handle.read(4)
    return magic == b"PK\x03\x04" or magic[:1] == b"\x80"  # zip (torch >= 1.6) or pickle protocol >= 2


def _gist(err):
    """torch's load errors run to a page; keep the line that names the problem."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "GLOBAL" in line:
            return line
    return lines[0] if lines else type(err).__name__


def _backbone_part(loaded, source, what):
    if "state_dict_backbone" in loaded:
        inner = loaded["state_dict_backbone"]
        if not isinstance(inner, Mapping):
            raise CheckpointError(f"{what} weights in {source}: 'state_dict_backbone' is a "
                                  f"{type(inner).__name__}, expected a state dict")
        return inner
    if loaded and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{what} weights in {source}: a dict without tensors and without "
                              f"'state_dict_backbone' (keys: {', '.join(map(str, list(loaded)[:10]))})")
    return loaded


def _strip_wrappers(state):
    stripped = {}
    for key, value in state.items():
        key = str(key)
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def _listing(kind, items):
    shown = ", ".join(items[:SHOWN])
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return f"{len(items)} {kind} ({shown}{more})"


def _hint(expected, state, mismatched):
    shared = sum(1 for k in expected if k in state)
    if shared < len(expected) / 2:
        return ". The file seems to hold a different network (fewer than half of the model's keys are in it)"
    if mismatched:
        return (". Same network family: check num_features (embedding_size), input_size and width against "
                "the run that wrote the file")
    return ""
