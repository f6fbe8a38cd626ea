import os
import textwrap
from pathlib import Path

import pytest

from arcface.config import load_config
from arcface.config_keys import ALL_KEYS, ENGINE_KEYS, UPSTREAM_KEYS
from arcface.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

UPSTREAM_MS1MV3_R50 = '''
from easydict import EasyDict as edict

# make training faster
# our RAM is 256G
# mount -t tmpfs -o size=140G  tmpfs /train_tmp

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', "agedb_30"]
'''


def write(tmp_path, text, name="job.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_upstream_config_file_loads_unchanged(tmp_path):
    cfg = load_config(write(tmp_path, UPSTREAM_MS1MV3_R50, "ms1mv3_r50.py"))
    assert cfg.network == "r50" and cfg.num_classes == 93431 and cfg.fp16 is True
    assert cfg.output == os.path.join("work_dirs", "ms1mv3_r50")
    assert cfg.margin_scale == 64.0 and cfg.clip_grad_norm == 5.0  # upstream's hard-coded values as defaults
    assert cfg.kd.enabled is False


def test_path_without_py_suffix_like_upstream(tmp_path):
    write(tmp_path, UPSTREAM_MS1MV3_R50, "ms1mv3_r50.py")
    cfg = load_config(tmp_path / "ms1mv3_r50")
    assert cfg.config_name == "ms1mv3_r50"


def test_unknown_key_names_nearest(tmp_path):
    path = write(tmp_path, UPSTREAM_MS1MV3_R50 + "config.weight_decy = 1e-4\n")
    with pytest.raises(ConfigError, match=r"weight_decy.*did you mean 'weight_decay'"):
        load_config(path)


def test_overrides_and_nested_kd(tmp_path):
    path = write(tmp_path, UPSTREAM_MS1MV3_R50)
    cfg = load_config(path, ["lr=0.05", "kd.enabled=True", "network=mbf", "val_targets=[]"])
    assert cfg.lr == 0.05 and cfg.kd.enabled is True and cfg.network == "mbf" and cfg.val_targets == []
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_config(path, ["batchsize=3"])


def test_value_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(write(tmp_path, UPSTREAM_MS1MV3_R50 + "config.optimizer = 'adam'\n"))
    with pytest.raises(ConfigError, match="rec"):
        load_config(write(tmp_path, UPSTREAM_MS1MV3_R50.replace('config.rec = "/train_tmp/ms1m-retinaface-t1"', "")))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.py")
    with pytest.raises(ConfigError, match="defines no `config`"):
        load_config(write(tmp_path, "x = 1\n", "empty.py"))


def test_legacy_keys_are_accepted(tmp_path, caplog):
    path = write(tmp_path, UPSTREAM_MS1MV3_R50 + "config.loss = 'arcface'\nconfig.decay_epoch = [10, 16]\n")
    cfg = load_config(path)
    assert cfg.decay_epoch == [10, 16]
    assert any("legacy key 'loss'" in r.message for r in caplog.records)


def test_base_defaults_cover_exactly_the_documented_keys():
    from arcface.config_defaults import engine_defaults
    documented = set(UPSTREAM_KEYS) | set(ENGINE_KEYS)
    assert set(engine_defaults()) == documented


def test_every_key_is_in_docs_configs_md():
    text = (ROOT / "docs" / "configs.md").read_text()
    missing = [k for k in ALL_KEYS if f"`{k}`" not in text]
    assert not missing, f"keys missing from docs/configs.md: {missing}"


def test_docs_configs_md_is_generated_from_the_code():
    from arcface.tools import gen_config_docs
    assert (ROOT / "docs" / "configs.md").read_text() == gen_config_docs.render(), \
        "docs/configs.md is stale: run python tools/gen_config_docs.py"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    if path.name == "base.py":
        return
    cfg = load_config(path)
    assert cfg.num_classes > 0
