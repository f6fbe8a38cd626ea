"""Training datasets: RecordIO (no mxnet), an image folder, and upstream's synthetic speed-test set.

Every sample is a CHW float32 tensor normalised as upstream ((x - 127.5) / 127.5, RGB) and an int64
label; with `return_index=True` also the dataset index and whether the image was flipped. The flip is a
pure function of (seed, epoch, index) (`flip_decisions`), so a teacher-embedding cache can compute which
view the student saw without talking to the loader workers.
"""
import io
import logging
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from ..errors import DataError
from .layout import read_layout, unpack_record
from .recordio import RecordIO
from .samplers import hash64

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
# a bad record is replaced by the next index; this many bad ones in a row means the file is broken
MAX_CONSECUTIVE_BAD = 16
_WORKER_SLOTS = 256  # bad-record counters, one per DataLoader worker (+ the main process), never shared

def flip_decisions(seed, epoch, indices):
    """bool array: is sample `indices[i]` horizontally flipped in `epoch` of a run seeded with `seed`.

    Independent of workers, ranks and batch order; about half the samples flip in each epoch.
    """
    return (hash64(seed, epoch, indices) >> np.uint64(63)).astype(bool)


def to_tensor(img, input_size, flip):
    """PIL image -> CHW float32 in [-1, 1], RGB, resized to input_size when the stored size differs."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (input_size, input_size):
        img = img.resize((input_size, input_size), Image.BILINEAR)
    arr = np.asarray(img)
    if flip:
        arr = arr[:, ::-1]
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()
    return t.sub_(127.5).div_(127.5)


def decode_image(data, where):
    """Bytes -> fully loaded PIL image; DataError naming `where` when it is not an image."""
    if not data:
        raise DataError(f"{where}: empty image payload")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where}: undecodable image ({type(exc).__name__}: {exc})") from None
    return img


class _FaceDataset(Dataset):
    """Shared sample logic: flip, normalise, bad-record substitution and counting."""

    def __init__(self, input_size, flip, return_index, skip_bad_records, seed):
        self.input_size = int(input_size)
        self.flip = bool(flip)
        self.return_index = bool(return_index)
        self.skip_bad_records = bool(skip_bad_records)
        self.seed = int(seed)
        self.epoch = 0
        # one slot per process so increments never race; shared memory so the parent sees the workers' counts
        self._bad = torch.zeros(_WORKER_SLOTS, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch):
        """Select the flips of this epoch (call before creating the epoch's iterator)."""
        self.epoch = int(epoch)

    @property
    def bad_records(self):
        """Bad records skipped so far (all workers of this dataset object together)."""
        return int(self._bad.sum())

    def flips(self, indices, epoch=None):
        """Flip decisions for `indices` in `epoch` (default: the current one)."""
        if not self.flip:
            return np.zeros(len(indices), dtype=bool)
        return flip_decisions(self.seed, self.epoch if epoch is None else epoch, indices)

    def _load(self, index):  # -> PIL image; raises DataError
        raise NotImplementedError

    def __getitem__(self, index):
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        for attempt in range(MAX_CONSECUTIVE_BAD):
            i = (index + attempt) % n
            try:
                img = self._load(i)
                break
            except DataError as exc:
                if not self.skip_bad_records:
                    raise
                info = get_worker_info()
                self._bad[(info.id + 1) % _WORKER_SLOTS if info else 0] += 1
                log.warning("skipping bad record (skip_bad_records=True): %s", exc)
        else:
            raise DataError(f"{MAX_CONSECUTIVE_BAD} bad records in a row from dataset index {index}; "
                            "the data file looks broken")
        flipped = bool(self.flips([i])[0])
        img = to_tensor(img, self.input_size, flipped)
        label = int(self.labels[i])
        if self.return_index:
            return img, label, i, flipped
        return img, label


class RecordDataset(_FaceDataset):
    """Images of a train.rec/train.idx folder (insightface or im2rec layout), read without mxnet.

    The file is opened lazily in each process (DataLoader workers never share a handle). Only numpy arrays
    of offsets and labels are kept, so a 42M-image index costs ~700 MB once, not a dict per worker.
    """

    def __init__(self, root_dir, input_size=112, flip=True, return_index=False, skip_bad_records=False,
                 num_classes=None, seed=0, layout=None):
        super().__init__(input_size, flip, return_index, skip_bad_records, seed)
        self.layout = layout if layout is not None else read_layout(root_dir, num_classes,
                                                                    skip_bad_records=skip_bad_records)
        if layout is not None:
            self.layout.check_num_classes(num_classes)
        self.rec_path = self.layout.rec_path
        self.keys = self.layout.image_keys
        self.offsets = self.layout.offsets
        self.labels = self.layout.labels
        self._reader = None

    def __len__(self):
        return int(self.keys.size)

    @property
    def bad_records(self):
        """Bad records so far: those the label scan left out plus those skipped while reading."""
        return super().bad_records + int(getattr(self.layout, "skipped", 0))

    def _load(self, i):
        if self._reader is None:
            self._reader = RecordIO(self.rec_path, "r")
        key, offset = int(self.keys[i]), int(self.offsets[i])
        buf = self._reader.read_at(offset, key)
        header, payload = unpack_record(buf, self.rec_path, key, offset)
        where = f"{self.rec_path} key {key} at byte offset {offset}"
        self._check_label(header, i, where)
        return decode_image(payload, where)

    def _check_label(self, header, i, where):
        """The label trained on is the record's own header label (upstream's); refuse one that disagrees with
        the label the layout gave it (identity records, label cache) rather than relabel silently."""
        stored = float(header.label[0] if header.flag > 0 else header.label)
        if stored != float(np.float32(self.labels[i])):  # at the header's float32 precision; NaN never equals
            raise DataError(f"{where}: the record's header says label {stored:g} but {self.layout.label_origin(i)}")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = None  # re-opened in the worker
        return state


class ImageFolderDataset(_FaceDataset):
    """root/<identity>/<image>: one sub-folder per identity, labels by sorted folder name (as torchvision)."""

    def __init__(self, root, input_size=112, flip=True, return_index=False, skip_bad_records=False,
                 num_classes=None, seed=0):
        super().__init__(input_size, flip, return_index, skip_bad_records, seed)
        self.root = str(root)
        self.paths, self.labels, self.classes = scan_image_folder(self.root)
        if num_classes is not None and len(self.classes) > num_classes:
            raise DataError(f"{self.root}: {len(self.classes)} identity folders but num_classes={num_classes}; "
                            f"folder '{self.classes[num_classes]}' would get label {num_classes}")

    def __len__(self):
        return len(self.paths)

    def _load(self, i):
        path = self.paths[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc})") from None
        return decode_image(data, path)


def scan_image_folder(root):
    """(paths, int64 labels, class names) of root/<identity>/<image>, both levels sorted by name."""
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(e.name for e in os.scandir(folder)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        paths.extend(os.path.join(folder, f) for f in files)
        labels.extend([label] * len(files))
    if not paths:
        raise DataError(f"{root}: no images found; expected one sub-folder per identity holding "
                        f"{'/'.join(IMAGE_EXTENSIONS)} files (or a train.rec/train.idx pair)")
    return paths, np.asarray(labels, dtype=np.int64), classes


class SyntheticDataset(Dataset):
    """Upstream's speed-test data: one fixed random image, label 1, for every index."""

    def __init__(self, length=1_000_000, input_size=112, return_index=False, seed=0):
        rng = np.random.default_rng(seed)
        img = rng.integers(0, 255, size=(input_size, input_size, 3), dtype=np.int32)
        img = torch.from_numpy(img.transpose(2, 0, 1).copy()).float()
        self.img = ((img / 255) - 0.5) / 0.5
        self.label = 1
        self.length = int(length)
        self.return_index = bool(return_index)
        self.labels = np.broadcast_to(np.int64(self.label), (self.length,))
        self.epoch = 0
        self.bad_records = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if self.return_index:
            return self.img, self.label, index, False
        return self.img, self.label
