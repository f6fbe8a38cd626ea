"""patches/: the UKD graft applied to an arcface_torch-shaped train_v2.py (tests/fixtures/upstream_standin).

The stand-in has upstream's loop shape and anchor lines, runs on CPU, and is copied to tmp_path, patched with
`git apply` and run in-process for a few steps: kd absent/disabled is bit-identical to the unpatched script,
kd enabled adds the KD terms to the loss that is backpropagated, keeps the teacher frozen, trains the
projector in the backbone's group, checkpoints 'state_ukd' and resumes it exactly.
"""
import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import traceback

import pytest
import torch

from arcface.backbones import get_model
from arcface.engine.precision import autocast_for
from arcface.errors import CheckpointError, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCHES = os.path.join(ROOT, "patches")
PATCH = os.path.join(PATCHES, "ukd_train_v2.patch")
CHECKER = os.path.join(PATCHES, "check_checkout.py")
STANDIN = os.path.join(ROOT, "tests", "fixtures", "upstream_standin")
TARGET = "recognition/arcface_torch/train_v2.py"

if PATCHES not in sys.path:
    sys.path.insert(0, PATCHES)
import check_checkout  # noqa: E402
import ukd_graft  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


# ---------------------------------------------------------------------------------------------- helpers
def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def checkout(tmp_path, name, patched):
    """A copy of the stand-in as a git repository, optionally with the patch applied by `git apply`."""
    root = tmp_path / name
    shutil.copytree(STANDIN, root)
    assert git("init", "-q", cwd=root).returncode == 0
    if patched:
        res = git("apply", PATCH, cwd=root)
        assert res.returncode == 0, res.stderr
    return root


def write_config(path, **values):
    with open(path, "w") as f:
        f.write("from easydict import EasyDict as edict\n\nconfig = edict(" + repr(values) + ")\n")
    return str(path)


def run_standin(root, config_path):
    """Import the checkout's train_v2.py under a fresh name and run main(); returns its per-step losses."""
    folder = os.path.join(root, "recognition", "arcface_torch")
    sys.path.insert(0, folder)
    sys.modules.pop("standin_parts", None)
    try:
        spec = importlib.util.spec_from_file_location(f"standin_train_v2_{abs(hash(str(root)))}",
                                                      os.path.join(folder, "train_v2.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        try:
            return module.main(argparse.Namespace(config=config_path))
        except BaseException as exc:
            traceback.clear_frames(exc.__traceback__)  # no DDP object may outlive the process group
            raise
        finally:
            sys.modules["standin_parts"].leave_process_group()
    finally:
        sys.path.remove(folder)
        sys.modules.pop("standin_parts", None)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("teacher") / "model.pt"
    torch.save(get_model("r18", num_features=16, input_size=16, width=0.25).state_dict(), path)
    return str(path)


def kd_section(teacher_file, **kw):
    kd = dict(enabled=True, teacher_network="r18", teacher_weights=teacher_file, teacher_embedding_size=16,
              teacher_network_kwargs={"width": 0.25}, teacher_check=False,
              losses={"iled": {"weight": 1.0}, "rpsd": {"weight": 2.0, "bank": 64, "k_neg": 8,
                                                        "require_positives": False}})
    kd.update(kw)
    return kd


class RecordingGraft(ukd_graft.UKDGraft):
    """The real graft, plus a record of what it did for the assertions."""
    instances = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps, self.saves, self.loaded = [], 0, None
        self.projector_init = self.projector.weight.detach().clone() if self.projector is not None else None
        RecordingGraft.instances.append(self)

    def add_kd_terms(self, loss, *args):
        total = super().add_kd_terms(loss, *args)
        self.steps.append((loss.item(), {k: v.item() for k, v in self.last_terms.items()}, total.item()))
        return total

    def load_state(self, checkpoint):
        super().load_state(checkpoint)
        self.loaded = {"projector": self.projector.weight.detach().clone(),
                       "composer": {k: v.clone() for k, v in self.plugin.composer.state_dict().items()}}

    def state_dict(self):
        # keep the checkpoint of the previous epoch, to resume from it in another folder
        path = os.path.join(self.cfg.output, "checkpoint_gpu_0.pt")
        if os.path.exists(path):
            shutil.copy(path, f"{path}.epoch{self.saves}")
        self.saves += 1
        return super().state_dict()


@pytest.fixture
def recording(monkeypatch):
    RecordingGraft.instances = []
    monkeypatch.setattr(ukd_graft, "UKDGraft", RecordingGraft)
    return RecordingGraft.instances


# ---------------------------------------------------------------------------------------------- the patch
def test_patch_adds_lines_only_and_every_hook_is_guarded():
    hunks = check_checkout.read_hunks(PATCH)
    assert len(hunks) == 5
    with open(PATCH) as f:
        text = f.read()
    body = text[text.index("diff --git"):].splitlines()
    assert all(not l.startswith("-") or l.startswith("--- a/") for l in body)
    assert f"+++ b/{TARGET}" in body and f"--- a/{TARGET}" in body
    assert hunks[0].added[1] == "    ukd = None"
    for hunk in hunks[1:]:  # with kd absent or disabled, no added statement runs
        assert hunk.added[0].strip().startswith("if ukd is not None:")
    assert "loss = ukd.add_kd_terms(loss, img, local_embeddings, local_labels, global_step)" in hunks[2].added[1]
    assert hunks[2].context[2].strip().startswith("loss: torch.Tensor = module_partial_fc(")
    assert hunks[3].context[2].strip() == "lr_scheduler.step()"


def test_apply_then_reverse_restores_the_file_byte_for_byte(tmp_path):
    root = checkout(tmp_path, "co", patched=False)
    original, mode = (root / TARGET).read_bytes(), os.stat(root / TARGET).st_mode
    assert git("apply", "--check", PATCH, cwd=root).returncode == 0
    assert git("apply", PATCH, cwd=root).returncode == 0
    patched = (root / TARGET).read_text()
    assert patched.count("UKD graft") == 6 and len(patched.splitlines()) == len(original.splitlines()) + 18
    again = git("apply", "--check", PATCH, cwd=root)
    assert again.returncode != 0  # a second application is refused
    assert git("apply", "-R", PATCH, cwd=root).returncode == 0
    assert (root / TARGET).read_bytes() == original and os.stat(root / TARGET).st_mode == mode


@pytest.mark.skipif(shutil.which("patch") is None, reason="no patch(1) binary")
def test_patch_p1_applies_too(tmp_path):
    root = tmp_path / "plain"
    shutil.copytree(STANDIN, root)
    with open(PATCH) as f:
        res = subprocess.run(["patch", "-p1", "--dry-run"], stdin=f, cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------- check_checkout
def test_check_checkout_passes_on_the_standin(tmp_path):
    root = checkout(tmp_path, "co", patched=False)
    res = subprocess.run([sys.executable, CHECKER, str(root)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "all 30 anchor lines of the 5 hunks found" in res.stdout


def test_check_checkout_names_the_file_and_the_missing_anchor(tmp_path, capsys):
    root = checkout(tmp_path, "co", patched=False)
    path = root / TARGET
    text = path.read_text()
    path.write_text(text.replace("    backbone._set_static_graph()\n", "    backbone.train()  # local change\n"))
    assert check_checkout.main([str(root)]) == check_checkout.MISMATCH
    err = capsys.readouterr().err
    assert str(path) in err and "hunk 1" in err and "'    backbone._set_static_graph()'" in err
    assert "missing" in err and "hunk 2" not in err
    assert git("apply", "--check", PATCH, cwd=root).returncode != 0  # git agrees

    path.write_text(text.replace("            lr_scheduler.step()\n", "        lr_scheduler.step()\n"))
    assert check_checkout.main([str(path)]) == check_checkout.MISMATCH
    err = capsys.readouterr().err
    assert "hunk 4" in err and "other indentation" in err


def test_check_checkout_reports_applied_and_absent(tmp_path, capsys):
    root = checkout(tmp_path, "co", patched=True)
    assert check_checkout.main([str(root / "recognition" / "arcface_torch")]) == check_checkout.ALREADY_APPLIED
    assert "already applied" in capsys.readouterr().err
    assert check_checkout.main([str(tmp_path / "nowhere")]) == check_checkout.NOT_FOUND
    assert "no train_v2.py found" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("UKD_UPSTREAM_TRAIN_V2"),
                    reason="set UKD_UPSTREAM_TRAIN_V2 to a real upstream train_v2.py to check it too")
def test_real_upstream_file(tmp_path):
    root = tmp_path / "upstream"
    (root / "recognition" / "arcface_torch").mkdir(parents=True)
    shutil.copy(os.environ["UKD_UPSTREAM_TRAIN_V2"], root / TARGET)
    assert check_checkout.main([str(root)]) == check_checkout.OK
    assert git("init", "-q", cwd=root).returncode == 0
    res = git("apply", "--check", PATCH, cwd=root)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------------------------- running it
def test_kd_absent_or_disabled_is_bit_identical_to_unpatched(tmp_path, teacher_file, recording):
    plain, patched = checkout(tmp_path, "plain", False), checkout(tmp_path, "patched", True)
    common = dict(gradient_acc=2, num_image=32)
    runs = {
        "plain": (plain, write_config(tmp_path / "a.py", output=str(tmp_path / "a"), **common)),
        "absent": (patched, write_config(tmp_path / "b.py", output=str(tmp_path / "b"), **common)),
        "disabled": (patched, write_config(tmp_path / "c.py", output=str(tmp_path / "c"), **common,
                                           kd=dict(kd_section(teacher_file), enabled=False))),
        "plain_fp16": (plain, write_config(tmp_path / "d.py", output=str(tmp_path / "d"), fp16=True, **common)),
        "absent_fp16": (patched, write_config(tmp_path / "e.py", output=str(tmp_path / "e"), fp16=True,
                                              **common)),
    }
    losses = {name: run_standin(root, cfg) for name, (root, cfg) in runs.items()}
    assert recording == []  # no graft was built
    assert len(losses["plain"]) == 4 and losses["absent"] == losses["plain"] == losses["disabled"]
    assert losses["absent_fp16"] == losses["plain_fp16"] != losses["plain"]
    for ref, other in (("a", "b"), ("a", "c"), ("d", "e")):
        assert_same_tensors(load(tmp_path / ref / "model.pt"), load(tmp_path / other / "model.pt"))
        ck_ref, ck = load(tmp_path / ref / "checkpoint_gpu_0.pt"), load(tmp_path / other / "checkpoint_gpu_0.pt")
        assert "state_ukd" not in ck
        assert_same_tensors(ck_ref, ck)


def test_kd_enabled_adds_terms_keeps_teacher_frozen_and_saves_state(tmp_path, teacher_file, recording):
    plain, patched = checkout(tmp_path, "plain", False), checkout(tmp_path, "patched", True)
    ref = run_standin(plain, write_config(tmp_path / "a.py", output=str(tmp_path / "a"), num_image=32))
    out = tmp_path / "kd"
    losses = run_standin(patched, write_config(tmp_path / "kd.py", output=str(out), num_image=32,
                                               kd=kd_section(teacher_file)))
    (graft,) = recording
    assert len(graft.steps) == len(losses) == 4
    for (cls, terms, total), logged in zip(graft.steps, losses):
        assert set(terms) == {"kd/iled", "kd/rpsd"} and all(v > 0 for v in terms.values())
        assert logged == total == pytest.approx(cls + sum(terms.values()), rel=1e-6)  # what was backpropagated
    # the graft drew no random numbers from the host's stream: same first batch, same init, same CE
    assert graft.steps[0][0] == ref[0]

    teacher_state = load(teacher_file)
    teacher = graft.teacher
    assert not teacher.training and not teacher.backbone.training
    for name, p in teacher.backbone.named_parameters():
        assert not p.requires_grad and p.grad is None
        assert torch.equal(p, teacher_state[name]), name
    for name, b in teacher.backbone.named_buffers():  # BN statistics untouched (eval mode)
        assert torch.equal(b, teacher_state[name]), name

    # the projector (student 8-d -> teacher 16-d) rides on the DDP wrapper: optimised and clipped with the backbone
    projector = graft.projector
    assert tuple(projector.weight.shape) == (16, 8)
    assert any(p is projector.weight for p in graft.backbone.parameters())
    assert not any(p is projector.weight for p in graft.backbone.module.parameters())
    assert not torch.equal(projector.weight, graft.projector_init)

    ck = load(out / "checkpoint_gpu_0.pt")
    state = ck["state_ukd"]
    assert torch.equal(state["plugin"]["projector"]["weight"], projector.weight)
    assert state["teacher_network"] == "r18" and state["teacher_embedding_size"] == 16
    bank = {k: v for k, v in state["plugin"]["composer"].items() if "bank" in k}
    assert int(bank["terms.rpsd.bank.valid"].sum()) == 32 and bank["terms.rpsd.bank.feats"].shape == (64, 16)
    n_backbone = len(load(out / "model.pt")) - sum(k.endswith("num_batches_tracked") or "running" in k
                                                   for k in load(out / "model.pt"))
    group0 = ck["state_optimizer"]["param_groups"][0]["params"]
    assert len(group0) == n_backbone + 1  # + the projector, in the backbone's group
    assert all(i in ck["state_optimizer"]["state"] for i in group0)  # all of them stepped (momentum buffers)
    model = load(out / "model.pt")
    assert set(model) == set(load(tmp_path / "a" / "model.pt")) and not any("ukd" in k for k in model)


def test_resume_restores_state_ukd_and_continues_exactly(tmp_path, teacher_file, recording):
    patched = checkout(tmp_path, "patched", True)
    common = dict(num_image=16, num_epoch=2, kd=kd_section(teacher_file))
    full = run_standin(patched, write_config(tmp_path / "full.py", output=str(tmp_path / "full"), **common))
    epoch1 = tmp_path / "full" / "checkpoint_gpu_0.pt.epoch1"
    os.makedirs(tmp_path / "resumed")
    shutil.copy(epoch1, tmp_path / "resumed" / "checkpoint_gpu_0.pt")
    resumed = run_standin(patched, write_config(tmp_path / "res.py", output=str(tmp_path / "resumed"),
                                                resume=True, **common))
    first, second = recording
    saved = load(epoch1)["state_ukd"]["plugin"]
    assert torch.equal(second.loaded["projector"], saved["projector"]["weight"])
    assert not torch.equal(second.loaded["projector"], second.projector_init)
    assert_same_tensors(second.loaded["composer"], saved["composer"])
    assert int(saved["composer"]["terms.rpsd.bank.valid"].sum()) == 16
    assert len(full) == 4 and resumed == full[2:]  # the second epoch, bit for bit
    assert_same_tensors(load(tmp_path / "full" / "model.pt"), load(tmp_path / "resumed" / "model.pt"))
    assert_same_tensors(load(tmp_path / "full" / "checkpoint_gpu_0.pt")["state_ukd"],
                        load(tmp_path / "resumed" / "checkpoint_gpu_0.pt")["state_ukd"])


def test_resume_without_state_ukd_is_a_clear_error(tmp_path, teacher_file, recording):
    plain, patched = checkout(tmp_path, "plain", False), checkout(tmp_path, "patched", True)
    out = tmp_path / "out"
    run_standin(plain, write_config(tmp_path / "a.py", output=str(out), num_image=16, embedding_size=16))
    with pytest.raises(CheckpointError, match=r"checkpoint_gpu_0\.pt has no 'state_ukd' entry"):
        run_standin(patched, write_config(tmp_path / "b.py", output=str(out), num_image=16, embedding_size=16,
                                          resume=True, kd=kd_section(teacher_file)))


def test_fp16_path_with_kd(tmp_path, teacher_file, recording):
    patched = checkout(tmp_path, "patched", True)
    out = tmp_path / "out"
    losses = run_standin(patched, write_config(tmp_path / "a.py", output=str(out), num_image=16, fp16=True,
                                               gradient_acc=2, kd=kd_section(teacher_file)))
    (graft,) = recording
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert [s[2] for s in graft.steps] == losses
    state = load(out / "checkpoint_gpu_0.pt")["state_ukd"]["plugin"]
    assert int(state["composer"]["terms.rpsd.bank.valid"].sum()) == 16  # one optimizer step: both micro-batches
    # the teacher runs as the student does: autocast where this device runs it fast (fp32 on AVX2-only CPUs)
    assert graft.plugin.teacher.backbone.fp16 == autocast_for(True, "cpu")[0]


@pytest.mark.dist
def test_two_processes_keep_projector_and_banks_in_sync(tmp_path, teacher_file):
    """torchrun, 2 gloo ranks: the projector has its own DDP, so it stays identical across ranks."""
    patched = checkout(tmp_path, "patched", True)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "a.py", output=str(out), num_image=32, kd=kd_section(teacher_file))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train_v2.py", cfg], cwd=patched / "recognition" / "arcface_torch", env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [load(out / f"checkpoint_gpu_{r}.pt") for r in range(2)]
    assert [ck["global_step"] for ck in ranks] == [2, 2]
    states = [ck["state_ukd"]["plugin"] for ck in ranks]
    assert_same_tensors(states[0], states[1])  # projector and memory banks
    assert int(states[0]["composer"]["terms.rpsd.bank.valid"].sum()) == 32  # 2 steps x global batch 16
    weights = [{k: v for k, v in ck["state_dict_backbone"].items() if "running" not in k} for ck in ranks]
    assert_same_tensors(weights[0], weights[1])  # upstream's own DDP, untouched (BN statistics stay per rank)
    assert os.path.isfile(out / "model.pt")


# ---------------------------------------------------------------------------------------------- graft checks
class Wrapper(torch.nn.Module):
    """Just enough of DistributedDataParallel for the graft: the student under .module."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def graft_config(teacher_file, **kw):
    sys.path.insert(0, os.path.join(STANDIN, "recognition", "arcface_torch"))
    try:
        import standin_parts
        cfg = standin_parts.base_config()
    finally:
        sys.path.pop(0)
        sys.modules.pop("standin_parts", None)
    cfg.update(output="unused", kd=kd_section(teacher_file))
    cfg.update(kw)
    return cfg


def test_kd_enabled_reads_configs_without_kd():
    from easydict import EasyDict as edict
    assert not ukd_graft.kd_enabled(edict(lr=0.1))
    assert not ukd_graft.kd_enabled(edict(kd=None))
    assert not ukd_graft.kd_enabled(edict(kd=edict(enabled=False)))
    assert ukd_graft.kd_enabled(edict(kd=edict(enabled=True)))


def test_graft_rejects_what_it_does_not_expect(teacher_file):
    cfg = graft_config(teacher_file)
    with pytest.raises(ConfigError, match="DistributedDataParallel-wrapped student"):
        ukd_graft.UKDGraft(cfg, torch.nn.Linear(4, 8))
    with pytest.raises(ConfigError, match="cfg.kd.enabled is not True"):
        ukd_graft.UKDGraft(dict(cfg, kd={"enabled": False}), Wrapper(torch.nn.Linear(4, 8)))
    no_acc = dict(cfg)
    del no_acc["gradient_acc"]
    with pytest.raises(ConfigError, match="lacks gradient_acc"):
        ukd_graft.UKDGraft(no_acc, Wrapper(torch.nn.Linear(4, 8)))

    backbone = Wrapper(torch.nn.Linear(4, 8))
    graft = ukd_graft.UKDGraft(cfg, backbone)
    img, labels = torch.zeros(2, 3, 16, 16), torch.tensor([0, 1])
    with pytest.raises(ConfigError, match=r"local_embeddings \[2, cfg.embedding_size=8\]"):
        graft.add_kd_terms(torch.tensor(1.0), img, torch.zeros(2, 5), labels, 1)
    with pytest.raises(ConfigError, match="scalar Partial FC loss"):
        graft.add_kd_terms(torch.ones(2), img, torch.zeros(2, 8), labels, 1)
    late_opt = torch.optim.SGD(backbone.module.parameters(), lr=0.1)  # built before the graft: no projector
    with pytest.raises(ConfigError, match="not in the optimizer's first param group"):
        graft.after_step(1, late_opt)
    with pytest.raises(CheckpointError, match=r"unused/checkpoint_gpu_0\.pt has no 'state_ukd'"):
        graft.load_state({"epoch": 1})
    with pytest.raises(ConfigError, match="built twice"):
        ukd_graft.UKDGraft(cfg, backbone)

    # the projector rides on the wrapper; an optimizer over backbone.parameters() holds it
    opt = torch.optim.SGD(backbone.parameters(), lr=0.1)
    emb = torch.randn(2, 8, requires_grad=True)
    total = graft.add_kd_terms(emb.sum() * 0, torch.randn(2, 3, 16, 16), emb, labels, 1)
    total.backward()
    assert graft.projector.weight.grad is not None and emb.grad is not None
    graft.after_step(1, opt)
    same = ukd_graft.UKDGraft(graft_config(teacher_file, embedding_size=16), Wrapper(torch.nn.Linear(4, 16)))
    with pytest.raises(CheckpointError, match="written with a KD projector, but this run has none"):
        same.load_state({"state_ukd": graft.state_dict()})
