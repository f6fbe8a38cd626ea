"""The training loop: it learns, resumes exactly, keeps checkpoints safe, and runs plugins."""
import os

import pytest
import torch

from arcface.config import base_config, validate
from arcface.engine.trainer import train
from arcface.errors import CheckpointError, TrainingDiverged
from engine_utils import CrashAfter, TensorLoader, make_data


def tiny_cfg(tmp_path, **kw):
    cfg = base_config()
    cfg.update(dict(rec="synthetic", num_classes=8, num_image=96, network="mbf", embedding_size=16,
                    input_size=16, network_kwargs={"width": 0.25}, batch_size=8, lr=0.05, num_epoch=2,
                    warmup_epoch=0, output=str(tmp_path / "out"), frequent=2, tensorboard=False,
                    save_all_states=True, seed=7, num_workers=0, val_targets=[], clip_grad_norm=5.0))
    cfg.update(kw)
    cfg.config_name = "tiny"
    return validate(cfg)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_loss_decreases_and_files_are_written(tmp_path):
    images, labels = make_data()
    cfg = tiny_cfg(tmp_path, num_epoch=4)
    trainer = train(cfg, TensorLoader(images, labels, 8))
    losses = [l for _, l in trainer.history]
    assert len(losses) == 4 * 12
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 * 0.8
    out = cfg.output
    assert os.path.isfile(os.path.join(out, "model.pt")) and os.path.isfile(os.path.join(out, "checkpoint_gpu_0.pt"))
    log = open(os.path.join(out, "training.log")).read()
    assert "samples/sec" in log and "Global Step: 48" in log and "LearningRate" in log
    sd = weights(os.path.join(out, "model.pt"))
    assert not any(k.startswith("module.") for k in sd)


def test_resume_mid_epoch_equals_uninterrupted(tmp_path):
    images, labels = make_data()
    full = tiny_cfg(tmp_path / "a", plugins=[{"name": "feature_norm", "weight": 0.001}])
    train(full, TensorLoader(images, labels, 8))

    part = tiny_cfg(tmp_path / "b", save_every_steps=5, plugins=[{"name": "feature_norm", "weight": 0.001}])
    with pytest.raises(KeyboardInterrupt):
        train(part, CrashAfter(TensorLoader(images, labels, 8), 7))
    ckpt = torch.load(os.path.join(part.output, "checkpoint_gpu_0.pt"), weights_only=False)
    assert ckpt["global_step"] == 5 and ckpt["batch_in_epoch"] == 5 and ckpt["epoch"] == 0
    assert ckpt["state_plugins"]["feature_norm"]["steps_seen"] == 5
    part.resume = True
    trainer = train(part, TensorLoader(images, labels, 8))
    assert trainer.global_step == 24
    a, b = weights(os.path.join(full.output, "model.pt")), weights(os.path.join(part.output, "model.pt"))
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    ca = torch.load(os.path.join(full.output, "checkpoint_gpu_0.pt"), weights_only=False)
    cb = torch.load(os.path.join(part.output, "checkpoint_gpu_0.pt"), weights_only=False)
    assert torch.allclose(ca["state_dict_softmax_fc"]["weight"], cb["state_dict_softmax_fc"]["weight"], atol=1e-6)
    assert cb["state_plugins"]["feature_norm"]["steps_seen"] == 24


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    images, labels = make_data()
    cfg = tiny_cfg(tmp_path, gradient_acc=3, num_epoch=1)
    trainer = train(cfg, TensorLoader(images, labels, 8))
    assert trainer.global_step == 4 and trainer.schedule.total_step == 4  # 12 batches / 3 micro-steps


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    from arcface.engine.plugins import PLUGINS, Plugin, register_plugin

    if "nan_at_step" not in PLUGINS:
        @register_plugin("nan_at_step")
        class NanAt(Plugin):
            def __init__(self, cfg, step=3):
                super().__init__(cfg)
                self.step = step

            def after_forward(self, batch):
                bad = float("nan") if batch.step == self.step else 0.0
                return {"nan": batch.embeddings.sum() * 0 + bad}

    images, labels = make_data()
    cfg = tiny_cfg(tmp_path, save_every_steps=2, plugins=[{"name": "nan_at_step", "step": 3}])
    with pytest.raises(TrainingDiverged, match="global step 3"):
        train(cfg, TensorLoader(images, labels, 8))
    ckpt = torch.load(os.path.join(cfg.output, "checkpoint_gpu_0.pt"), weights_only=False)
    assert ckpt["global_step"] == 2
    for v in ckpt["state_dict_backbone"].values():
        assert torch.isfinite(v.float()).all()


def test_resume_refuses_other_world_size_and_missing_files(tmp_path):
    images, labels = make_data()
    cfg = tiny_cfg(tmp_path, num_epoch=1)
    train(cfg, TensorLoader(images, labels, 8))
    path = os.path.join(cfg.output, "checkpoint_gpu_0.pt")
    ckpt = torch.load(path, weights_only=False)
    ckpt["world_size"] = 8
    torch.save(ckpt, path)
    cfg.resume = True
    with pytest.raises(CheckpointError, match="8 processes"):
        train(cfg, TensorLoader(images, labels, 8))
    cfg2 = tiny_cfg(tmp_path / "empty", resume=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(cfg2, TensorLoader(images, labels, 8))


def test_pretrained_backbone_must_match(tmp_path):
    images, labels = make_data()
    cfg = tiny_cfg(tmp_path, num_epoch=1)
    train(cfg, TensorLoader(images, labels, 8))
    other = tiny_cfg(tmp_path / "b", num_epoch=1, pretrained_backbone=os.path.join(cfg.output, "model.pt"))
    train(other, TensorLoader(images, labels, 8))  # same network: loads
    wrong = tiny_cfg(tmp_path / "c", num_epoch=1, embedding_size=32,
                     pretrained_backbone=os.path.join(cfg.output, "model.pt"))
    with pytest.raises(CheckpointError):
        train(wrong, TensorLoader(images, labels, 8))


def test_adamw_and_bf16_autocast_train(tmp_path):
    """AdamW with both param groups, and fp16=True (bf16 autocast on CPU) still learns with fp32 embeddings."""
    images, labels = make_data()
    cfg = tiny_cfg(tmp_path, optimizer="adamw", lr=0.01, weight_decay=0.05, fp16=True, num_epoch=3)
    trainer = train(cfg, TensorLoader(images, labels, 8))
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and len(trainer.optimizer.param_groups) == 2
    assert trainer.precision.scaler is None  # no GradScaler off CUDA
    losses = [l for _, l in trainer.history]
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6
