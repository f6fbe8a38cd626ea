"""Engine behaviour a careful arcface_torch user relies on: the run's length, precision on CPUs, threads, the log
line, config values refused at load time, and Weights & Biases logging."""
import os
import textwrap

import pytest
import torch

from arcface.config import load_config
from arcface.engine import device as device_module
from arcface.engine import precision
from arcface.engine.trainer import train
from arcface.errors import ConfigError
from engine_utils import TensorLoader, make_data
from test_trainer import tiny_cfg


# ---- the run's length: num_epoch, max_steps and the LR schedule ---------------------------------------------------

def last_lr(trainer):
    return trainer.optimizer.param_groups[0]["lr"]


def test_max_steps_alone_runs_across_epochs_and_ends_the_schedule_at_zero(tmp_path):
    images, labels = make_data()  # 96 images / batch 8 = 12 steps an epoch
    trainer = train(tiny_cfg(tmp_path, num_epoch=0, max_steps=18), TensorLoader(images, labels, 8))
    assert trainer.global_step == 18 and trainer.schedule.total_step == 18
    assert last_lr(trainer) == 0.0  # today's bug: stopped after one epoch with the LR at 0.033


def test_max_steps_shorter_than_the_epochs_is_the_schedule(tmp_path):
    images, labels = make_data()
    trainer = train(tiny_cfg(tmp_path, num_epoch=2, max_steps=5), TensorLoader(images, labels, 8))
    assert trainer.global_step == 5 and last_lr(trainer) == 0.0
    trainer = train(tiny_cfg(tmp_path / "epochs", num_epoch=1, max_steps=100), TensorLoader(images, labels, 8))
    assert trainer.global_step == 12 and last_lr(trainer) == 0.0


# ---- precision on CPUs, threads ---------------------------------------------------------------------------------

def test_fp16_on_a_cpu_without_fast_bf16_trains_in_float32_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: False)
    assert precision.autocast_for(True, "cpu")[0] is False
    assert precision.autocast_for(True, "cuda")[0] is True and precision.autocast_for(False, "cuda")[0] is False
    images, labels = make_data()
    trainer = train(tiny_cfg(tmp_path, fp16=True, num_epoch=1), TensorLoader(images, labels, 8))
    assert trainer.backbone.fp16 is False
    log = open(os.path.join(trainer.cfg.output, "training.log")).read()
    assert "precision: float32: fp16=True, but this CPU has no fast bf16 kernels" in log
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: True)
    trainer = train(tiny_cfg(tmp_path / "fast", fp16=True, num_epoch=1), TensorLoader(images, labels, 8))
    assert trainer.backbone.fp16 is True


def test_thread_count_follows_cores_and_local_processes_unless_set(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(device_module, "cpu_count", lambda: 8)
        assert device_module.configure_threads(None, 2) == (4, "8 cores / 2 local processes")
        assert torch.get_num_threads() == 4
        assert device_module.configure_threads(3, 2) == (3, "num_threads in the config")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert device_module.configure_threads(None, 2) == (1, "OMP_NUM_THREADS=1")
    finally:
        torch.set_num_threads(before)


# ---- the log line -----------------------------------------------------------------------------------------------

def test_log_line_shows_the_margin_loss_as_loss_then_the_other_terms(tmp_path):
    images, labels = make_data()
    plain = train(tiny_cfg(tmp_path / "plain", num_epoch=1), TensorLoader(images, labels, 8))
    with_term = train(tiny_cfg(tmp_path / "term", num_epoch=1, plugins=[{"name": "feature_norm", "weight": 0.5}]),
                      TensorLoader(images, labels, 8))
    line = with_term.logger.last_line
    assert "Required: 0 hours" in line and "   total " in line and "loss/feature_norm" in line
    loss = float(line.split("Loss ")[1].split()[0])
    total = float(line.split("total ")[1].split()[0])
    term = float(line.split("loss/feature_norm ")[1].split()[0])
    assert total == pytest.approx(loss + term, abs=2e-4)  # Loss is the margin-softmax part alone
    assert "total" not in plain.logger.last_line and "loss/" not in plain.logger.last_line
    log = open(os.path.join(with_term.cfg.output, "training.log")).read()
    assert "    feature_norm/mean_norm" in log  # statistics on a line of their own


# ---- config values refused when the config loads ----------------------------------------------------------------

def job(tmp_path, extra):
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent("""
        from easydict import EasyDict as edict
        config = edict()
        config.rec = "synthetic"
        config.num_classes = 10
    """) + textwrap.dedent(extra))
    return path


@pytest.mark.parametrize("line, message", [
    ("config.lr = -0.1", r"`lr` must be a number > 0, got -0.1"),
    ("config.lr = 'abc'", r"`lr` must be a number > 0, got 'abc'"),
    ("config.momentum = 'x'", r"`momentum` must be a number >= 0 and <= 1, got 'x'"),
    ("config.verbose = 0", r"`verbose` must be an int >= 1, got 0"),
    ("config.sample_rate = 0", r"`sample_rate` must be a number > 0 and <= 1, got 0"),
    ("config.num_epoch = 0", r"`num_epoch` = 0 needs `max_steps`"),
    ("config.batch_size = 8.5", r"`batch_size` must be an int >= 1, got 8.5"),
    ("config.dali = True\nconfig.sampler = 'pk'", r"dali=True .* cannot honour sampler='pk'"),
    ("config.dali = True\nconfig.skip_bad_records = True", r"cannot honour skip_bad_records=True"),
    ("config.num_threads = 0", r"`num_threads` must be an int >= 1 \(or None\), got 0"),
])
def test_bad_values_are_refused_at_load_time(tmp_path, line, message):
    with pytest.raises(ConfigError, match=message):
        load_config(job(tmp_path, line + "\n"))


def test_a_key_is_suggested_by_meaning_as_well_as_spelling(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'; did you mean 'lr'"):
        load_config(job(tmp_path, "config.learning_rate = 0.1\n"))
    with pytest.raises(ConfigError, match="unknown config key 'epochs'; did you mean 'num_epoch'"):
        load_config(job(tmp_path, "config.epochs = 3\n"))


def test_a_config_error_is_not_a_key_error():
    assert not issubclass(ConfigError, KeyError)
    try:
        try:
            raise ConfigError("bad value")
        except KeyError:  # code that handles a missing dict key must not swallow a config mistake
            pytest.fail("ConfigError was caught as a KeyError")
    except ConfigError as exc:
        assert str(exc) == "bad value"


# ---- Weights & Biases, offline ----------------------------------------------------------------------------------

def test_wandb_logs_offline_as_upstream(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from arcface.engine.wandb_run import WandbRun
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged, artifacts = [], []
    real_start = WandbRun.start

    def recording_start(cfg, rank):  # a real offline run, with its log calls recorded on the way through
        run = real_start(cfg, rank)
        real_log, real_artifact = run.run.log, run.run.log_artifact
        run.run.log = lambda data, *a, **k: (logged.append(dict(data)), real_log(data, *a, **k))[1]
        run.run.log_artifact = lambda art, *a, **k: (artifacts.append(art.name), real_artifact(art, *a, **k))[1]
        return run
    monkeypatch.setattr(WandbRun, "start", staticmethod(recording_start))
    images, labels = make_data()
    cfg = tiny_cfg(tmp_path, num_epoch=1, using_wandb=True, wandb_project="ukd-test", suffix_run_name="tiny",
                   save_artifacts=True)
    trainer = train(cfg, TensorLoader(images, labels, 8))
    runs = [d for d in os.listdir(os.path.join(cfg.output, "wandb")) if d.startswith("offline-run-")]
    assert len(runs) == 1 and trainer.wandb.name.endswith("_GPU0_tiny")
    files = os.listdir(os.path.join(cfg.output, "wandb", runs[0]))
    assert any(name.endswith(".wandb") for name in files)  # the run's records, for `wandb sync`
    steps = [entry for entry in logged if "Loss/Step Loss" in entry]
    assert len(steps) == trainer.global_step
    assert {"Loss/Step Loss", "Loss/Train Loss", "Process/Step", "Process/Epoch"} <= set(steps[-1])
    assert steps[-1]["Process/Step"] == trainer.global_step
    assert steps[0]["Loss/Step Loss"] == pytest.approx(trainer.history[0][1], rel=1e-6)  # the margin loss (no KD)
    assert artifacts == [f"{trainer.wandb.name}_E0", f"{trainer.wandb.name}_Final"]


def test_wandb_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    images, labels = make_data()
    with pytest.raises(ConfigError, match=r"using_wandb=True needs the wandb package: pip install 'ukd\[wandb\]'"):
        train(tiny_cfg(tmp_path, num_epoch=1, using_wandb=True), TensorLoader(images, labels, 8))


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    from easydict import EasyDict as edict
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"local rank 1 has no GPU of its own: this machine shows 1 .*"
                                          r"--nproc_per_node=1"):
        device_module.pick_device(edict(device="cuda"))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert device_module.pick_device(edict(device="auto")) == torch.device("cuda", 0)
