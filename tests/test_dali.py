"""DALI loader, CPU pipeline: insightface-layout rec via a filtered index, labels/images as RecordDataset."""
import io

import numpy as np
import pytest
import torch
from easydict import EasyDict as edict
from PIL import Image

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (optional extra [dali])")

from arcface.data.dali import DaliTrainLoader, image_index_path  # noqa: E402
from arcface.data.datasets import RecordDataset  # noqa: E402
from arcface.data.layout import read_layout  # noqa: E402
from arcface.data.loader import get_dataloader  # noqa: E402
from arcface.data.packing import write_insightface_rec  # noqa: E402
from arcface.data.recordio import read_index  # noqa: E402


def jpeg(rng, size=32):
    buf = io.BytesIO()
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    small.resize((size, size), Image.BILINEAR).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali") / "rec"
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), [3, 2, 4, 1, 3])
    write_insightface_rec(root, labels, [jpeg(rng) for _ in labels], image_size=(32, 32))
    return root, labels


def test_filtered_index_lists_only_images(rec):
    root, labels = rec
    layout = read_layout(root)
    path = image_index_path(layout)
    keys, offsets = read_index(path)
    assert keys.tolist() == list(range(1, labels.size + 1))
    assert offsets.tolist() == layout.offsets.tolist()
    assert image_index_path(layout) == path  # reused, not rewritten


def test_cpu_pipeline_matches_record_dataset(rec):
    root, labels = rec
    loader = DaliTrainLoader(root, batch_size=4, device="cpu", input_size=32, flip=False, shuffle=False)
    ds = RecordDataset(root, input_size=32, flip=False)
    assert len(loader) == labels.size // 4 and loader.num_samples == labels.size
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        if epoch == 0:  # unshuffled: records in file order
            for b, batch in enumerate(batches):
                assert batch.labels.dtype == torch.int64 and batch.labels.shape == (4,)
                assert batch.index is None and batch.flip is None
                for j in range(4):
                    img, label = ds[b * 4 + j]
                    assert int(batch.labels[j]) == label
                    torch.testing.assert_close(batch.images[j], img, atol=1e-5, rtol=0)
        for batch in batches:
            assert set(batch.labels.tolist()) <= set(labels.tolist())


def test_ranks_get_equal_full_batches_and_config_dispatch(rec):
    root, labels = rec  # 13 images on 2 ranks: shards of 7 and 6 -> 2 batches of 3 on each rank
    counts = []
    for rank in range(2):
        cfg = edict(rec=str(root), batch_size=3, dali=True, dali_aug=True, seed=1, num_workers=1, input_size=24,
                    flip=True, num_classes=5, num_image=None)
        loader = get_dataloader(cfg, rank, 2, "cpu")
        assert isinstance(loader, DaliTrainLoader) and len(loader) == 2
        for epoch in range(2):
            loader.set_epoch(epoch)
            got = list(loader)
            counts.append(len(got))
            for b in got:
                assert b.images.shape == (3, 3, 24, 24) and b.images.abs().max() <= 1.0
    assert counts == [2, 2, 2, 2]
