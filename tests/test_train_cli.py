"""tools/train.py as users launch it: plain python (a group of one) and torchrun with 2 gloo processes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

CONFIG = '''
from easydict import EasyDict as edict
config = edict()
config.network = "mbf"
config.network_kwargs = {"width": 0.25}
config.input_size = 16
config.embedding_size = 16
config.batch_size = 4
config.lr = 0.02
config.rec = "synthetic"
config.num_classes = 10
config.num_image = 32
config.num_epoch = 2
config.warmup_epoch = 0
config.frequent = 1
config.num_workers = 0
config.save_all_states = True
config.tensorboard = True
config.val_targets = []
'''


def run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_plain_python_run(tmp_path):
    (tmp_path / "job.py").write_text(CONFIG)
    proc = run([sys.executable, str(ROOT / "tools" / "train.py"), "job.py", "--set", f"output='{tmp_path / 'out'}'"],
               tmp_path)
    assert "Global Step: 16" in proc.stdout
    assert (tmp_path / "out" / "model.pt").is_file()
    assert any((tmp_path / "out" / "tensorboard").iterdir())


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_two_processes(tmp_path):
    (tmp_path / "job.py").write_text(CONFIG)
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = run([str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "tools" / "train.py"), "job.py",
                "--set", f"output='{tmp_path / 'out'}'"], tmp_path)
    assert "world_size 2" in proc.stdout and "Global Step: 8" in proc.stdout  # 32 images / (4 x 2) x 2 epochs
    out = tmp_path / "out"
    for rank in (0, 1):
        ckpt = torch.load(out / f"checkpoint_gpu_{rank}.pt", weights_only=False)
        assert ckpt["world_size"] == 2 and ckpt["state_dict_softmax_fc"]["weight"].shape[0] == 5
    assert (out / "model.pt").is_file()


def test_bad_config_exits_with_clear_message(tmp_path):
    (tmp_path / "job.py").write_text(CONFIG + "config.lerning_rate = 0.1\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "job.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'lerning_rate'" in proc.stderr
