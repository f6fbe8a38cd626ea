"""Faults of a training run, as a hostile user or a bad day produces them: killed and resumed runs in every mode, a
run that blows up, a changed config at resume, a full disk, killed writes, a failing or stopped rank, and a kill
inside the save window. Each case was found by a fault sweep; each test fails on the code before its fix."""
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from arcface.backbones import get_model
from arcface.config import base_config, validate
from arcface.data.loader import TrainLoader
from arcface.data.datasets import RecordDataset
from arcface.data.packing import write_insightface_rec
from arcface.engine import checkpoint as C
from arcface.engine.scheduler import poly_warmup_lr
from arcface.engine.trainer import train
from arcface.errors import CheckpointError, TrainingDiverged
from engine_utils import CrashAfter, TensorLoader, make_data
from test_trainer import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
SIZE, DIM = 16, 16


def jpeg(rng):
    img = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def small_rec(tmp_path_factory):
    """8 identities x 6 images in insightface's layout, and a tiny teacher for the KD modes."""
    folder = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(0)
    labels = [i // 6 for i in range(48)]
    write_insightface_rec(folder / "rec", labels, [jpeg(rng) for _ in labels], image_size=(SIZE, SIZE))
    torch.manual_seed(4)
    torch.save(get_model("r18", num_features=DIM, input_size=SIZE, width=0.25).state_dict(), folder / "teacher.pt")
    return folder


def rec_cfg(folder, output, kd, sample_rate, acc, sampler, **kw):
    cfg = base_config()
    cfg.update(dict(rec=str(folder / "rec"), num_classes=8, network="mbf", network_kwargs={"width": 0.25},
                    embedding_size=DIM, input_size=SIZE, batch_size=8, lr=0.05, num_epoch=2, output=str(output),
                    frequent=100, tensorboard=False, save_all_states=True, seed=5, num_workers=0, val_targets=[],
                    device="cpu", sample_rate=sample_rate, gradient_acc=acc, sampler=sampler, pk_k=2,
                    save_every_steps=1))
    if kd:
        cfg.kd.update(enabled=True, teacher_network="r18", teacher_network_kwargs={"width": 0.25},
                      teacher_weights=str(folder / "teacher.pt"), teacher_embedding_size=DIM, teacher_check=False,
                      losses={"iled": {"weight": 1.0}, "rpsd": {"weight": 1.0, "bank": 32, "k_neg": 4, "k_rand": 2,
                                                                 "require_positives": False}})
    cfg.update(kw)
    cfg.config_name = "faults"
    return validate(cfg)


def loader_of(cfg):
    dataset = RecordDataset(cfg.rec, input_size=SIZE, flip=True, return_index=True, num_classes=8, seed=cfg.seed)
    return TrainLoader(dataset, cfg.batch_size, "cpu", 0, 1, cfg.seed, num_workers=0, sampler=cfg.sampler,
                       pk_k=cfg.pk_k, pk_random_fraction=0.25)


def final_state(output):
    ckpt = torch.load(os.path.join(output, "checkpoint_gpu_0.pt"), weights_only=True)
    tensors = dict(ckpt["state_dict_backbone"])
    tensors["pfc"] = ckpt["state_dict_softmax_fc"]["weight"]
    for name, value in (ckpt["state_plugins"].get("ukd") or {}).get("composer", {}).items():
        if torch.is_tensor(value):
            tensors[f"ukd.{name}"] = value
    return ckpt["global_step"], tensors


MODES = [(kd, rate, acc, sampler) for kd in (False, True) for rate in (1.0, 0.5) for acc in (1, 2)
         for sampler in ("random", "pk")]


@pytest.mark.slow
@pytest.mark.parametrize("kd, rate, acc, sampler", MODES,
                         ids=[f"{'kd' if m[0] else 'plain'}-rate{m[1]}-acc{m[2]}-{m[3]}" for m in MODES])
def test_a_killed_and_resumed_run_equals_the_uninterrupted_one(small_rec, tmp_path, kd, rate, acc, sampler):
    full = rec_cfg(small_rec, tmp_path / "full", kd, rate, acc, sampler)
    train(full, loader_of(full))
    part = rec_cfg(small_rec, tmp_path / "part", kd, rate, acc, sampler)
    with pytest.raises(KeyboardInterrupt):
        train(part, CrashAfter(loader_of(part), 9))  # in the second epoch; with acc 2 inside a step
    part.resume = True
    train(part, loader_of(part))
    step_a, a = final_state(full.output)
    step_b, b = final_state(part.output)
    assert step_a == step_b and set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), rtol=1e-5, atol=1e-6, msg=key)


# ---- a run that blows up ------------------------------------------------------------------------------------

def test_no_checkpoint_of_blown_up_weights_and_the_message_names_the_good_one(tmp_path):
    images, labels = make_data()
    cfg = tiny_cfg(tmp_path / "e6", lr=1e6, save_every_steps=1, num_epoch=1)
    with pytest.raises(TrainingDiverged, match="after global step 1 .* not saved; no checkpoint has been written yet"):
        train(cfg, TensorLoader(images, labels, 8))  # step 1 already blew the weights up to ~1e28: nothing saved
    assert not os.path.exists(os.path.join(cfg.output, "checkpoint_gpu_0.pt"))
    cfg = tiny_cfg(tmp_path, lr=100.0, save_every_steps=1, num_epoch=1)
    with pytest.raises(TrainingDiverged, match=r"the last good checkpoint is .*checkpoint_gpu_0.pt \(global step 1\)"):
        train(cfg, TensorLoader(images, labels, 8))
    ckpt = torch.load(os.path.join(cfg.output, "checkpoint_gpu_0.pt"), weights_only=True)
    assert ckpt["global_step"] == 1  # the checkpoint of step 2 (NaN at the next forward) was refused
    cfg.resume, cfg.lr = True, 0.05  # and the run resumes from it with a sane lr
    trainer = train(cfg, TensorLoader(images, labels, 8))
    assert trainer.global_step == 12


def test_divergence_without_any_checkpoint_says_so(tmp_path):
    images, labels = make_data()
    with pytest.raises(TrainingDiverged, match="no resumable checkpoint exists \\(save_all_states=False\\)"):
        train(tiny_cfg(tmp_path, lr=1e6, save_all_states=False, num_epoch=1), TensorLoader(images, labels, 8))


# ---- resume with another config ------------------------------------------------------------------------------

def test_resume_with_a_changed_lr_follows_the_new_schedule_and_says_so(tmp_path, monkeypatch):
    from arcface.engine.trainer import Trainer
    images, labels = make_data()
    cfg = tiny_cfg(tmp_path, save_every_steps=4, num_epoch=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, CrashAfter(TensorLoader(images, labels, 8), 6))
    lrs = []
    real_end = Trainer._end_of_step

    def recording_end(self, *args):
        lrs.append((self.global_step, self.optimizer.param_groups[0]["lr"]))  # the lr this step updates with
        return real_end(self, *args)
    monkeypatch.setattr(Trainer, "_end_of_step", recording_end)
    cfg.resume, cfg.lr, cfg.num_epoch = True, 0.02, 3
    trainer = train(cfg, TensorLoader(images, labels, 8))
    log = open(os.path.join(cfg.output, "training.log")).read()
    assert "resume: the config changes the schedule (lr 0.05 -> 0.02" in log and "total steps 24 -> 36" in log
    assert trainer.global_step == 36 and lrs[0][0] == 4
    for step, lr in lrs:  # every step after the resume on the new curve (today: the old one, silently)
        assert lr == pytest.approx(poly_warmup_lr(0.02, step, 0, 36))


def test_resume_with_another_optimizer_is_a_clear_error(tmp_path):
    images, labels = make_data()
    cfg = tiny_cfg(tmp_path, num_epoch=1)
    train(cfg, TensorLoader(images, labels, 8))
    cfg.resume, cfg.optimizer = True, "adamw"
    with pytest.raises(CheckpointError, match="was trained with optimizer='sgd' but the config says 'adamw'"):
        train(cfg, TensorLoader(images, labels, 8))


def test_start_up_warns_about_unresumable_saves_and_removes_orphaned_temp_files(tmp_path):
    images, labels = make_data()
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = out / f"checkpoint_gpu_0.pt.tmp.{dead.pid}"
    orphan.write_bytes(b"\0" * 1000)
    train(tiny_cfg(tmp_path, save_all_states=False, save_every_steps=3, num_epoch=1), TensorLoader(images, labels, 8))
    log = open(out / "training.log").read()
    assert not orphan.exists() and f"removed {orphan}" in log
    assert "save_every_steps=3 writes only model.pt while save_all_states=False: nothing resumable" in log


def test_a_full_disk_during_a_checkpoint_write_says_so_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_gpu_0.pt"
    torch.save({"global_step": 1}, path)
    real_save = torch.save

    def full_disk(obj, target, *args, **kwargs):
        real_save(obj, target, *args, **kwargs)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=rf"no space left on the device writing {path}"):
        C.atomic_save({"global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["global_step"] == 1 and os.listdir(tmp_path) == ["checkpoint_gpu_0.pt"]


def test_a_single_process_run_leaves_no_rendezvous_folder(tmp_path):
    def ours():
        return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("ukd_pg_")}
    before = ours()
    images, labels = make_data()
    train(tiny_cfg(tmp_path, num_epoch=1), TensorLoader(images, labels, 8))
    assert ours() <= before


def test_checkpoints_load_without_pickle_and_old_pickled_ones_need_the_opt_in(tmp_path):
    images, labels = make_data()
    cfg = tiny_cfg(tmp_path, num_epoch=1)
    train(cfg, TensorLoader(images, labels, 8))
    path = os.path.join(cfg.output, "checkpoint_gpu_0.pt")
    ckpt = torch.load(path, weights_only=True)  # RNG states and all: tensors and plain types only
    ckpt["rng"]["numpy"] = np.random.get_state()  # what earlier versions stored: numpy objects, pickled
    torch.save(ckpt, path)
    cfg.resume, cfg.num_epoch = True, 2
    with pytest.raises(CheckpointError, match="resume_unsafe_pickle=True"):
        train(cfg, TensorLoader(images, labels, 8))
    cfg.resume_unsafe_pickle = True
    assert train(cfg, TensorLoader(images, labels, 8)).global_step == 24


# ---- several ranks -------------------------------------------------------------------------------------------

FAILING_PLUGIN = '''
import os, signal
from arcface.engine.plugins import Plugin, register_plugin

@register_plugin("fault_at_step")
class FaultAtStep(Plugin):
    def __init__(self, cfg, step=2, rank=1, how="raise"):
        super().__init__(cfg)
        self.step, self.rank, self.how = step, rank, how

    def after_forward(self, batch):
        if batch.step == self.step and int(os.environ.get("RANK", 0)) == self.rank:
            if self.how == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            raise RuntimeError(f"simulated failure on rank {self.rank} at step {self.step}")
        return {}
'''

JOB = '''
from easydict import EasyDict as edict
config = edict()
config.network = "mbf"
config.network_kwargs = {{"width": 0.25}}
config.input_size = 16
config.embedding_size = 16
config.batch_size = 4
config.rec = "synthetic"
config.num_classes = 10
config.num_image = 64
config.num_epoch = 2
config.num_workers = 0
config.tensorboard = False
config.val_targets = []
config.dist_timeout = {timeout}
config.plugin_modules = ["fault_plugin"]
config.plugins = [{{"name": "fault_at_step", "step": 2, "rank": 1, "how": "{how}"}}]
config.output = "{output}"
'''


def torchrun_job(tmp_path, how, timeout):
    (tmp_path / "fault_plugin.py").write_text(FAILING_PLUGIN)
    (tmp_path / "job.py").write_text(JOB.format(how=how, timeout=timeout, output=tmp_path / "out"))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).parent / "torchrun"
    started = time.time()
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "tools" / "train.py"),
                           "job.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    return proc, time.time() - started


@pytest.mark.dist
@pytest.mark.slow
def test_an_exception_on_one_rank_ends_every_rank_loudly(tmp_path):
    proc, seconds = torchrun_job(tmp_path, "raise", 60)
    assert proc.returncode != 0 and seconds < 120
    assert "simulated failure on rank 1 at step 2" in proc.stdout + proc.stderr


@pytest.mark.dist
@pytest.mark.slow
def test_a_stopped_rank_makes_the_other_fail_after_the_timeout_naming_the_step(tmp_path):
    """Two processes started by hand (torchrun would add half a minute of its own teardown): rank 1 stops itself
    (SIGSTOP) at step 2; rank 0 must fail after dist_timeout with the step named, not wait forever."""
    (tmp_path / "fault_plugin.py").write_text(FAILING_PLUGIN)
    (tmp_path / "job.py").write_text(JOB.format(how="stop", timeout=6, output=tmp_path / "out"))
    base = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tools" / "train.py"), "job.py"], cwd=tmp_path,
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    started = time.time()
    try:
        out, _ = procs[0].communicate(timeout=120)
    finally:
        procs[1].kill()
        procs[1].wait()
    assert procs[0].returncode != 0 and time.time() - started < 90
    assert "did not complete within dist_timeout=6 s at global step 2" in out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resume_worker(rank, port, output, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ckpt = C.load_checkpoint(output, rank, 2, num_classes=4)
        results.put((rank, "ok", int(ckpt["global_step"])))
    except CheckpointError as exc:
        results.put((rank, "error", str(exc)))
    finally:
        dist.destroy_process_group()


def fake_generation(output, rank, step, suffix=""):
    state = {"epoch": 0, "global_step": step, "state_dict_backbone": {}, "state_optimizer": {},
             "state_dict_softmax_fc": {"weight": torch.zeros(2, 3)}, "world_size": 2}
    torch.save(state, os.path.join(output, f"checkpoint_gpu_{rank}.pt{suffix}"))


def resume_two_ranks(output):
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_resume_worker, args=(free_port(), str(output), queue), nprocs=2, join=True)
    return sorted(queue.get() for _ in range(2))


@pytest.mark.dist
def test_a_kill_inside_the_save_window_leaves_ranks_that_agree(tmp_path):
    # killed after rank 0 wrote its next file, before the commit: the next file is dropped, step 2 resumes
    for rank in (0, 1):
        fake_generation(tmp_path, rank, 2)
    C.write_json({"global_step": 2, "world_size": 2}, str(tmp_path / C.COMMIT_FILE))
    fake_generation(tmp_path, 0, 3, ".next")
    assert resume_two_ranks(tmp_path) == [(0, "ok", 2), (1, "ok", 2)]
    assert not (tmp_path / "checkpoint_gpu_0.pt.next").exists()
    # killed after the commit, before rank 1's rename: the rename is finished, step 3 resumes
    fake_generation(tmp_path, 0, 3)
    fake_generation(tmp_path, 1, 3, ".next")
    C.write_json({"global_step": 3, "world_size": 2}, str(tmp_path / C.COMMIT_FILE))
    assert resume_two_ranks(tmp_path) == [(0, "ok", 3), (1, "ok", 3)]
    # files of different steps without a commit record (an earlier version's save, killed half-way): refused
    os.remove(tmp_path / C.COMMIT_FILE)
    fake_generation(tmp_path, 1, 2)
    results = resume_two_ranks(tmp_path)
    assert all(kind == "error" and "different steps ([3, 2]" in text for _, kind, text in results)
