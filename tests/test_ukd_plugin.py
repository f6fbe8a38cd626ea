"""The UKD plugin inside the training loop: frozen teacher, strict loading, projector, state, logging."""
import os

import pytest
import torch
from easydict import EasyDict as edict

from arcface.backbones import get_model
from arcface.engine.trainer import train
from arcface.errors import CheckpointError, ConfigError
from engine_utils import TensorLoader, make_data
from test_trainer import tiny_cfg


def kd_section(teacher_path, **kw):
    kd = edict(enabled=True, teacher_network="r18", teacher_weights=str(teacher_path), teacher_embedding_size=16,
               teacher_network_kwargs={"width": 0.25}, teacher_check=False,
               losses={"iled": {"weight": 1.0}, "rpsd": {"weight": 1.0, "bank": 64, "k_neg": 8, "require_positives": False}})
    kd.update(kw)
    return kd


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A teacher trained for a few steps by the engine itself (so its weights are a real model.pt)."""
    tmp = tmp_path_factory.mktemp("teacher")
    images, labels = make_data()
    cfg = tiny_cfg(tmp, network="r18", num_epoch=1)
    train(cfg, TensorLoader(images, labels, 8))
    return os.path.join(cfg.output, "model.pt")


def test_kd_run_keeps_teacher_frozen_and_logs_terms(tmp_path, teacher_file):
    images, labels = make_data()
    before = torch.load(teacher_file, weights_only=True)
    cfg = tiny_cfg(tmp_path, num_epoch=1, kd=kd_section(teacher_file))
    trainer = train(cfg, TensorLoader(images, labels, 8))
    plugin = trainer.plugins[0]
    assert plugin.name == "ukd"
    teacher = plugin.teacher
    assert not teacher.training and not teacher.backbone.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()  # what a student-side .train() would do
    assert not teacher.training and not teacher.backbone.training
    for k, v in teacher.backbone.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher changed: {k}"
    log = open(os.path.join(cfg.output, "training.log")).read()
    assert "kd/iled" in log and "kd/rpsd" in log and "teacher_ms" in log
    formula = next(line for line in log.splitlines() if "UKD: L = L_cls + " in line)
    assert "1.0 * iled(ratio=0.25" in formula and "1.0 * rpsd(bank=64" in formula
    ckpt = torch.load(os.path.join(cfg.output, "checkpoint_gpu_0.pt"), weights_only=False)
    state = ckpt["state_plugins"]["ukd"]
    assert any("bank" in k for k in state["composer"])
    model = torch.load(os.path.join(cfg.output, "model.pt"), weights_only=True)
    assert set(model) == set(get_model("mbf", num_features=16, input_size=16, width=0.25).state_dict())


def test_projector_when_sizes_differ_is_trained_saved_and_not_exported(tmp_path, teacher_file, monkeypatch):
    from plugins.ukd.plugin import UKDPlugin
    initial = []
    real_init = UKDPlugin.__init__

    def recording_init(self, cfg):
        real_init(self, cfg)
        initial.append(self.projector.weight.detach().clone())
    monkeypatch.setattr(UKDPlugin, "__init__", recording_init)
    images, labels = make_data()
    cfg = tiny_cfg(tmp_path, num_epoch=1, embedding_size=8, kd=kd_section(teacher_file))
    trainer = train(cfg, TensorLoader(images, labels, 8))
    proj = trainer.plugins[0].projector
    assert proj is not None and tuple(proj.weight.shape) == (16, 8)
    assert (proj.weight.detach() - initial[0]).abs().max() > 1e-4  # trained with the student
    ckpt = torch.load(os.path.join(cfg.output, "checkpoint_gpu_0.pt"), weights_only=False)
    assert torch.equal(ckpt["state_plugins"]["ukd"]["projector"]["weight"], proj.weight.detach())
    model = torch.load(os.path.join(cfg.output, "model.pt"), weights_only=True)
    assert not any("proj" in k for k in model)


def test_bad_teacher_settings_fail_at_start(tmp_path, teacher_file):
    images, labels = make_data()
    loader = TensorLoader(images, labels, 8)
    with pytest.raises(CheckpointError):  # weights of another network
        train(tiny_cfg(tmp_path / "a", kd=kd_section(teacher_file, teacher_network="r34")), loader)
    with pytest.raises(CheckpointError, match="does not exist|not found"):
        train(tiny_cfg(tmp_path / "b", kd=kd_section(tmp_path / "missing.pt")), loader)
    with pytest.raises(ConfigError, match="teacher_weights"):
        train(tiny_cfg(tmp_path / "c", kd=kd_section(teacher_file, teacher_weights=None)), loader)
    with pytest.raises(ConfigError, match="did you mean 'teacher_network'"):
        train(tiny_cfg(tmp_path / "d", kd=kd_section(teacher_file, teacher_netwrk="r18")), loader)
    with pytest.raises(ConfigError, match="ilde|iled"):
        train(tiny_cfg(tmp_path / "e", kd=kd_section(teacher_file, losses={"ilde": {"weight": 1}})), loader)
    with pytest.raises(ConfigError, match="bank"):  # bank smaller than the global batch
        train(tiny_cfg(tmp_path / "f", kd=kd_section(teacher_file, losses={"rpsd": {"weight": 1, "bank": 4, "require_positives": False}})),
              loader)


def _write_bin(path, pairs=40, size=16, seed=0):
    """A .bin of random images: no teacher can verify these, so accuracy stays near chance."""
    import io
    import pickle

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    bins = []
    for _ in range(2 * pairs):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
        bins.append(buf.getvalue())
    with open(path, "wb") as f:
        pickle.dump((bins, [bool(i % 2) for i in range(pairs)]), f)


def test_teacher_sanity_check_stops_a_poor_teacher_before_step_0(tmp_path, teacher_file):
    images, labels = make_data()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _write_bin(data_dir / "noise.bin")
    kd = kd_section(teacher_file, teacher_check=True, teacher_check_targets=["noise"], teacher_min_accuracy=0.9)
    cfg = tiny_cfg(tmp_path / "run", rec=str(data_dir), kd=kd)
    with pytest.raises(ConfigError, match="teacher sanity check failed.*noise.bin"):
        train(cfg, TensorLoader(images, labels, 8))
    assert not os.path.exists(os.path.join(cfg.output, "model.pt"))  # nothing trained, nothing written
    cfg = tiny_cfg(tmp_path / "run2", rec=str(data_dir), kd=kd_section(
        teacher_file, teacher_check=True, teacher_check_targets=["noise"], teacher_min_accuracy=0.0), num_epoch=1)
    train(cfg, TensorLoader(images, labels, 8))  # a threshold the teacher meets: training runs
    assert "teacher sanity check [noise]" in open(os.path.join(cfg.output, "training.log")).read()


def test_projector_none_is_allowed_for_relational_losses_only(tmp_path, teacher_file):
    images, labels = make_data()
    relational = kd_section(teacher_file, projector="none", losses={"sp": {"weight": 1.0}, "rkd": {"weight": 1.0}})
    trainer = train(tiny_cfg(tmp_path / "rel", num_epoch=1, embedding_size=8, kd=relational),
                    TensorLoader(images, labels, 8))
    assert trainer.plugins[0].projector is None  # an 8-d student distilled from a 16-d teacher, no projector
    with pytest.raises(ConfigError, match=r"kd.losses \['fc'\] compare the two embeddings one to one"):
        train(tiny_cfg(tmp_path / "fc", num_epoch=1, embedding_size=8,
                       kd=kd_section(teacher_file, projector="none", losses={"fc": {"weight": 1.0}})),
              TensorLoader(images, labels, 8))


def test_kd_moves_the_student_towards_the_teacher(tmp_path, teacher_file):
    """Through the engine's trainer: the same student, steps and data with and without FC distillation; the
    distilled one ends closer to the teacher on images it was not trained on."""
    from plugins.ukd.teacher import FrozenTeacher
    images, labels = make_data()
    held_out = make_data(n=128)[0][96:]  # the same identities, other noise: images the runs never saw
    teacher = FrozenTeacher(get_model("r18", num_features=16, input_size=16, width=0.25))
    teacher.backbone.load_state_dict(torch.load(teacher_file, weights_only=True))

    def mean_cos(trainer):
        student = trainer.backbone.eval()
        with torch.no_grad():
            return float(torch.nn.functional.cosine_similarity(student(held_out), teacher(held_out)).mean())

    plain = train(tiny_cfg(tmp_path / "plain", num_epoch=4), TensorLoader(images, labels, 8))
    kd = kd_section(teacher_file, losses={"fc": {"weight": 50.0}})
    distilled = train(tiny_cfg(tmp_path / "kd", num_epoch=4, kd=kd), TensorLoader(images, labels, 8))
    assert mean_cos(distilled) > mean_cos(plain) + 0.15
