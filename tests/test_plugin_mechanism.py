"""The engine's plugin mechanism: discovery (entry points, config.plugin_modules), plugin-owned config sections,
and KD losses found from their file alone."""
import sys
import textwrap

import pytest
import torch

from arcface.config import load_config
from arcface.engine import plugins as P
from arcface.errors import ConfigError

SECTION_PLUGIN = '''
from arcface.engine.plugins import ConfigSection, Plugin, register_plugin

@register_plugin("norm_target")
class NormTarget(Plugin):
    config_section = ConfigSection("norm_target", {"enabled": (False, "switch it on"),
                                                   "weight": (0.5, "factor of the term"),
                                                   "target": (3.0, "wanted embedding norm")})

    @classmethod
    def validate_section(cls, section):
        if section.weight < 0:
            raise ValueError("unreachable")  # replaced below by a ConfigError check
        return section

    def after_forward(self, batch):
        norms = batch.embeddings.float().norm(dim=1)
        return {"norm_target": self.cfg.norm_target.weight * (norms - self.cfg.norm_target.target).pow(2).mean()}
'''.replace('raise ValueError("unreachable")  # replaced below by a ConfigError check',
            'from arcface.errors import ConfigError; raise ConfigError("norm_target.weight must be >= 0")')


@pytest.fixture(autouse=True)
def restore_registry():
    """Plugins registered by a test are removed afterwards, so other tests (the docs) see the project's alone."""
    P.discover_plugins()
    table, sections, imported = dict(P.PLUGINS._table), dict(P._SECTIONS), set(P._IMPORTED)
    yield
    P.PLUGINS._table.clear()
    P.PLUGINS._table.update(table)
    P._SECTIONS.clear()
    P._SECTIONS.update(sections)
    P._IMPORTED.clear()
    P._IMPORTED.update(imported)


def job(tmp_path, text):
    path = tmp_path / "job.py"
    path.write_text("from easydict import EasyDict as edict\nconfig = edict()\nconfig.rec = 'synthetic'\n"
                    "config.num_classes = 10\n" + textwrap.dedent(text))
    return path


def test_the_project_plugins_come_from_entry_points():
    P.discover_plugins()
    assert {"ukd", "feature_norm"} <= set(P.PLUGINS.names())
    assert P.plugin_sections()["kd"].name == "ukd"


def test_a_plugin_module_named_in_the_config_owns_its_section(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_norm_plugin", raising=False)
    (tmp_path / "my_norm_plugin.py").write_text(SECTION_PLUGIN)
    path = job(tmp_path, "config.plugin_modules = ['my_norm_plugin']\nconfig.norm_target = edict(enabled=True)\n")
    cfg = load_config(path)
    assert cfg.norm_target == {"enabled": True, "weight": 0.5, "target": 3.0}  # defaults merged in
    assert [name for name, _ in P.enabled_plugins(cfg)] == ["norm_target"]
    plugin = P.build_plugins(cfg)[0]
    emb = torch.ones(2, 4)  # norm 2: (2 - 3)^2 = 1
    out = plugin.after_forward(P.StepBatch(images=None, labels=None, embeddings=emb, step=0))
    assert float(out["norm_target"]) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="norm_target: unknown key 'wieght'; did you mean 'weight'"):
        load_config(job(tmp_path, "config.plugin_modules = ['my_norm_plugin']\n"
                                  "config.norm_target = edict(wieght=1.0)\n"))
    with pytest.raises(ConfigError, match="must be >= 0"):
        load_config(job(tmp_path, "config.plugin_modules = ['my_norm_plugin']\n"
                                  "config.norm_target = edict(weight=-1.0)\n"))
    off = load_config(job(tmp_path, "config.plugin_modules = ['my_norm_plugin']\n"))
    assert "norm_target" not in [name for name, _ in P.enabled_plugins(off)]


def test_discovery_errors_name_the_module_and_the_key(tmp_path):
    with pytest.raises(ConfigError, match="plugin_modules: cannot import 'no_such_plugin_module'"):
        load_config(job(tmp_path, "config.plugin_modules = ['no_such_plugin_module']\n"))
    with pytest.raises(ConfigError, match="unknown config key 'kdd'; did you mean 'kd'"):
        load_config(job(tmp_path, "config.kdd = edict(enabled=True)\n"))
    with pytest.raises(ConfigError, match="'total_step' is not a config key.*remove it"):
        load_config(job(tmp_path, "config.total_step = 100\n"))
    with pytest.raises(ConfigError, match="unknown plugin 'feature_nrom'; did you mean 'feature_norm'"):
        load_config(job(tmp_path, "config.plugins = ['feature_nrom']\n"))


def test_two_plugins_cannot_claim_one_section():
    class A(P.Plugin):
        config_section = P.ConfigSection("kd", {"enabled": (False, "")})
    with pytest.raises(ValueError, match="claimed by two plugins"):
        P.register_plugin("another_kd")(A)


def test_a_kd_loss_is_found_from_its_file_alone(tmp_path, monkeypatch):
    """A new file in plugins/ukd/losses/ needs no import line: the loss package is scanned before a lookup."""
    import plugins.ukd.losses as losses_package
    from plugins.ukd.losses import registry
    (tmp_path / "half_cosine.py").write_text(textwrap.dedent('''
        import torch.nn.functional as F
        from plugins.ukd.batch import KDOutput
        from plugins.ukd.losses.base import KDLoss
        from plugins.ukd.losses.registry import register_kd_loss

        @register_kd_loss("half_cosine")
        class HalfCosine(KDLoss):
            def forward(self, batch):
                return KDOutput(loss=0.5 * (1 - F.cosine_similarity(batch.student, batch.teacher)).mean())
    '''))
    monkeypatch.setattr(losses_package, "__path__", list(losses_package.__path__) + [str(tmp_path)])
    monkeypatch.setattr(registry, "_LOADED", [])
    monkeypatch.delitem(registry.KD_LOSSES._table, "half_cosine", raising=False)
    loss = registry.build_kd_loss("half_cosine")
    from plugins.ukd.batch import KDBatch
    out = loss(KDBatch(student=torch.tensor([[1.0, 0.0]]), teacher=torch.tensor([[0.0, 1.0]]),
                       labels=torch.tensor([0])))
    assert float(out.loss) == pytest.approx(0.5)
    monkeypatch.delitem(registry.KD_LOSSES._table, "half_cosine")


# ---- head hooks: plugins that supply or move the class centres through Partial FC ------------------------------

class FixedCentres(P.Plugin):
    """Loads centres that depend only on the class id, freezes them, and records every call it gets."""
    calls = []

    def configure_head(self, head):
        ids = torch.arange(head.class_start, head.class_start + head.num_local, dtype=torch.float32)
        grid = torch.arange(head.weight.shape[1], dtype=torch.float32)
        head.weight.data.copy_(torch.cos(ids[:, None] * 0.7 + grid[None, :]))
        head.weight.requires_grad_(False)
        FixedCentres.calls.append(("configure", head.num_local))

    def before_head(self, head, batch):
        FixedCentres.calls.append(("before_head", batch.step))


class PullCentres(P.Plugin):
    """Moves each labelled centre halfway to the (detached) mean student embedding of its class, before the head."""

    def before_head(self, head, batch):
        with torch.no_grad():
            for label in batch.labels.unique():
                row = int(label) - head.class_start
                if 0 <= row < head.num_local:
                    mean = batch.embeddings[batch.labels == label].detach().mean(0)
                    head.weight[row] = 0.5 * head.weight[row] + 0.5 * mean


def test_head_hooks_supply_freeze_and_move_centres(tmp_path):
    from engine_utils import TensorLoader, make_data
    from test_trainer import tiny_cfg

    from arcface.engine.trainer import train
    P.register_plugin("fixed_centres")(FixedCentres)
    P.register_plugin("pull_centres")(PullCentres)
    FixedCentres.calls = []
    images, labels = make_data()
    cfg = tiny_cfg(tmp_path / "fixed", num_epoch=1, gradient_acc=2, plugins=["fixed_centres"])
    trainer = train(cfg, TensorLoader(images, labels, 8))
    ids = torch.arange(8, dtype=torch.float32)
    expected = torch.cos(ids[:, None] * 0.7 + torch.arange(16, dtype=torch.float32)[None, :])
    assert torch.equal(trainer.pfc.weight.detach(), expected)  # frozen: the optimizer never moved them
    assert FixedCentres.calls[0] == ("configure", 8)
    steps = [s for kind, s in FixedCentres.calls if kind == "before_head"]
    assert steps == [s for s in range(trainer.global_step) for _ in range(2)]  # once per micro-step
    plain = train(tiny_cfg(tmp_path / "plain", num_epoch=1), TensorLoader(images, labels, 8))
    assert not plain.head_hooks and trainer.head_hooks
    pulled = train(tiny_cfg(tmp_path / "pull", num_epoch=1, plugins=["pull_centres"]), TensorLoader(images, labels, 8))
    assert not torch.allclose(pulled.pfc.weight, plain.pfc.weight)
