"""The study's data: the training folder (generated once when the study gives make_synthetic options), its class and
image counts, the identity check of the splits, and the splits prepared for scoring."""
import os

from arcface.errors import ConfigError, DataError

from . import commands
from .evaluation import prepare_split
from .validation import check_disjoint_identities


def generate_data(study, launcher, log_dir, threads):
    """Run the generator for data.make_synthetic (it reuses a folder whose manifest matches the options)."""
    options = study.data.get("make_synthetic")
    if options is None:
        return False
    cmd = commands.make_synthetic_command(study.data["folder"], dict(options, workers=max(1, threads)))
    log = os.path.join(log_dir, "make_synthetic.log")
    if launcher(cmd, log, 1) != 0:
        from .runs import last_error_line
        raise DataError(f"generating {study.data['folder']} failed; see {log}: {last_error_line(log)}")
    return True


def training_counts(folder):
    """(num_classes, num_image) of a RecordIO training folder, from its generator manifest or its property file."""
    from arcface.data.synthetic import load_manifest

    manifest = load_manifest(folder)
    if manifest is not None:
        return int(manifest["counts"]["train_ids"]), int(manifest["counts"]["train_images"])
    prop = os.path.join(folder, "property")
    if not os.path.isfile(prop):
        raise DataError(f"data.folder {folder} has neither manifest.json nor property (train.rec's class count)")
    with open(prop) as f:
        classes = int(f.read().split(",")[0])
    from arcface.data.layout import read_layout
    return classes, len(read_layout(folder))


def check_data(study):
    """The training files and every split file exist, and val / test / training identities are disjoint."""
    folder = study.data["folder"]
    for name in ("train.rec", "train.idx"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise DataError(f"data.folder {folder} has no {name}; give data.make_synthetic options to generate it, "
                            "or point data.folder at a RecordIO training set")
    for split_name, split in (("val", study.val), ("test", study.test)):
        if not os.path.isdir(split.ijb):
            raise DataError(f"data.{split_name}.ijb: {split.ijb} is not a folder")
        if split.bin and not os.path.isfile(split.bin):
            raise DataError(f"data.{split_name}.bin: {split.bin} does not exist")
    return check_disjoint_identities(folder, study.val, study.test)


def prepare_splits(study, out, input_size, workers):
    """{'val': folder, 'test': folder} of the prepared (aligned, decoded) splits under out/splits."""
    folders = {}
    for name, split in (("val", study.val), ("test", study.test)):
        folders[name] = prepare_split(os.path.join(out, "splits", name), split.ijb, split.target, split.bin,
                                      input_size, workers)
    return folders


def check_input_size(what, size, expected):
    if int(size) != int(expected):
        raise ConfigError(f"{what} takes {size}x{size} images but the student takes {expected}x{expected}; the "
                          "study scores every model on the same prepared crops")
