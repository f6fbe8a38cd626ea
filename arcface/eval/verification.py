"""Pair verification on insightface `.bin` sets (lfw, cfp_fp, agedb_30, ...) with upstream's protocol.

A .bin is a pickle of (bins, issame_list): 2N encoded aligned faces, pair i = (bins[2i], bins[2i+1]).
Protocol (arcface_torch eval/verification.py): RGB, (x/255-0.5)/0.5, embed the image and its horizontal
flip, sum, L2-normalise, squared L2 distance; 10 contiguous folds, on each the threshold from
arange(0, 4, 0.01) that is best on the other nine; report mean +- std of the fold accuracies and XNorm,
the mean L2 norm of the raw embeddings of both views. TAR@FAR comes from the same distances.
"""
import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import DataError
from .bin_pickle import load_bin_pickle
from .metrics import far_key, kfold_accuracy, resolved_tar_at_far, roc_curve

VERIFICATION_THRESHOLDS = np.arange(0, 4, 0.01)
VERIFICATION_FARS = (1e-3, 1e-2, 1e-1)


@dataclass
class VerificationSet:
    """uint8 images [2N, 3, S, S] and issame [N]; the flips are a strided view, so they cost no memory."""

    name: str
    images: np.ndarray
    issame: np.ndarray

    @property
    def flips(self):
        return self.images[:, :, :, ::-1]

    def __len__(self):
        return int(self.issame.size)


def _decode(blob, input_size, path, index):
    if isinstance(blob, np.ndarray):
        blob = blob.tobytes()
    if not isinstance(blob, (bytes, bytearray)):
        raise DataError(f"{path}: image {index} is a {type(blob).__name__}, expected encoded image bytes")
    try:
        image = Image.open(io.BytesIO(bytes(blob)))
        image = image.convert("RGB")
    except Exception as err:  # PIL raises several types for corrupt data
        raise DataError(f"{path}: image {index} cannot be decoded ({err})") from err
    width, height = image.size
    if (width, height) != (input_size, input_size):
        scale = input_size / min(width, height)  # resize the short side, then centre-crop a square
        new_w, new_h = max(input_size, round(width * scale)), max(input_size, round(height * scale))
        image = image.resize((new_w, new_h), Image.BILINEAR)
        left, top = (new_w - input_size) // 2, (new_h - input_size) // 2
        image = image.crop((left, top, left + input_size, top + input_size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def load_bin(path, input_size=112, name=None):
    """Decode a .bin into a VerificationSet; a missing, malformed or hostile file is a DataError naming it.

    The pickle is read by a restricted unpickler (bin_pickle.py): a .bin cannot run code.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"verification set {path} does not exist")
    loaded = load_bin_pickle(path)
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2):
        raise DataError(f"{path} must hold a pickled (bins, issame_list) pair, got {type(loaded).__name__}")
    bins, issame = loaded
    issame = _issame_array(issame, path)
    if not isinstance(bins, (list, tuple)):
        raise DataError(f"{path}: the images must be a list of encoded images, got {type(bins).__name__}")
    if len(bins) != 2 * issame.size:
        raise DataError(f"{path} holds {len(bins)} images for {issame.size} pairs; expected {2 * issame.size}")
    images = np.empty((len(bins), 3, input_size, input_size), dtype=np.uint8)
    for index, blob in enumerate(bins):
        images[index] = _decode(blob, input_size, path, index)
    if name is None:
        name = os.path.splitext(os.path.basename(path))[0]
    return VerificationSet(name=name, images=images, issame=issame)


def _issame_array(issame, path):
    """bool [N] of the pair labels: a list / tuple of bools (python or numpy) or a bool array."""
    if isinstance(issame, np.ndarray):
        if issame.ndim != 1 or issame.dtype.kind not in "biu" or not np.isin(issame, (0, 1)).all():
            raise DataError(f"{path}: issame must be a 1-d array of booleans, got {issame.dtype} {issame.shape}")
        return issame.astype(bool)
    if not isinstance(issame, (list, tuple)):
        raise DataError(f"{path}: issame must be a list of booleans, got {type(issame).__name__}")
    bad = next((i for i, v in enumerate(issame) if not isinstance(v, (bool, np.bool_, int, np.integer))
                or v not in (0, 1)), None)
    if bad is not None:
        raise DataError(f"{path}: issame[{bad}] is {issame[bad]!r}, expected a boolean")
    return np.asarray(issame, dtype=bool).reshape(-1)


def embed_views(embedder, dataset, batch_size=64, progress=False):
    """Raw float64 embeddings of the images and of their flips, [2N, d] each (upstream keeps float64)."""
    from tqdm import tqdm

    embedder = _as_embedder(embedder)
    count = dataset.images.shape[0]
    views = []
    for data in (dataset.images, dataset.flips):
        out = None
        starts = range(0, count, batch_size)
        for start in tqdm(starts, desc=f"{dataset.name} embed", disable=not progress, leave=False):
            emb = embedder(np.ascontiguousarray(data[start:start + batch_size]))
            if out is None:
                out = np.zeros((count, emb.shape[1]), dtype=np.float64)
            out[start:start + emb.shape[0]] = emb
        views.append(out)
    return views


def l2_normalise(x):
    """Rows divided by their norm; zero rows stay zero (sklearn.preprocessing.normalize)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return x / norms


def evaluate_embeddings(emb, emb_flip, issame, nfolds=10, fars=VERIFICATION_FARS):
    """The protocol on precomputed views; returns accuracy / std / xnorm / best_threshold / tar_at_far."""
    issame = np.asarray(issame, dtype=bool)
    xnorm = float(np.concatenate([np.linalg.norm(emb, axis=1), np.linalg.norm(emb_flip, axis=1)]).mean())
    joint = l2_normalise(emb + emb_flip)
    dist = np.sum(np.square(joint[0::2] - joint[1::2]), axis=1)
    fold_acc, fold_thr = kfold_accuracy(dist, issame, VERIFICATION_THRESHOLDS, nfolds)
    overall = ((dist[:, None] < VERIFICATION_THRESHOLDS[None, :]) == issame[:, None]).mean(0)
    impostors = int((~issame).sum())
    if issame.any() and impostors:
        fpr, tpr, _ = roc_curve(issame.astype(np.int64), -dist)
        tars = resolved_tar_at_far(fpr, tpr, fars, impostors)  # the IJB tables use the same rule
    else:
        tars = {float(far): None for far in fars}
    return {
        "accuracy": float(fold_acc.mean()),
        "std": float(fold_acc.std()),
        "xnorm": xnorm,
        "best_threshold": float(VERIFICATION_THRESHOLDS[int(np.argmax(overall))]),
        "fold_accuracies": fold_acc.tolist(),
        "fold_thresholds": fold_thr.tolist(),
        "tar_at_far": {far_key(far): tar for far, tar in tars.items()},
        "pairs": int(issame.size),
        "impostor_pairs": impostors,
    }


def evaluate_verification(embedder, dataset, batch_size=64, nfolds=10, fars=VERIFICATION_FARS, progress=False):
    """Embed a VerificationSet (image + flip) and score it with upstream's 10-fold protocol."""
    emb, emb_flip = embed_views(embedder, dataset, batch_size, progress)
    return evaluate_embeddings(emb, emb_flip, dataset.issame, nfolds, fars)


def _as_embedder(embedder):
    import torch

    if isinstance(embedder, torch.nn.Module):
        from .embedder import TorchEmbedder

        return TorchEmbedder(embedder)
    return embedder
