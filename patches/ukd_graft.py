"""The adapter that patches/ukd_train_v2.patch calls from a user's own arcface_torch train_v2.py.

It wraps upstream's objects at run time around our UKD plugin (plugins.ukd, from `pip install -e /path/to/ukd`),
driving it with the engine's own PluginDriver and TermWindow (arcface/engine/plugin_driver.py: the same hook
order, wrapping and log names as our trainer), while upstream keeps its own loss scaling, clipping, accumulation
and checkpoint files:

    UKDGraft(cfg, backbone, ...)      after the DDP wrap, before the optimizer: teacher (frozen, never DDP),
                                      projector (own DDP when distributed) attached to the DDP wrapper, so
                                      `backbone.parameters()` - the optimizer's first group and the clip - holds it
                                      while `backbone.module` (model.pt) stays the bare student
    ukd.load_state(dict_checkpoint)   resume: projector + memory banks from checkpoint['state_ukd']
    ukd.add_kd_terms(loss, img, ...)  right after `loss = module_partial_fc(...)`: loss + weighted KD terms
    ukd.after_step(global_step, opt)  after lr_scheduler.step(): memory banks once per optimizer step, logging
    ukd.state_dict()                  -> checkpoint['state_ukd']

The patched script builds a UKDGraft only when cfg.kd.enabled; otherwise it runs exactly as before.
Anything that is not what the patch expects (a backbone that is not DDP-wrapped, an optimizer built before the
graft, embeddings of the wrong size, a checkpoint without 'state_ukd') raises a ConfigError/CheckpointError
saying which line of train_v2.py to look at.
"""
import logging
import os

import torch
from easydict import EasyDict as edict

from arcface.engine.hooks import StepBatch, TrainContext
from arcface.engine.plugin_driver import PluginDriver, TermWindow, log_scalars
from arcface.errors import CheckpointError, ConfigError
from plugins.ukd.plugin import UKDPlugin

log = logging.getLogger("ukd_graft")

STATE_KEY = "state_ukd"            # the new entry of upstream's checkpoint_gpu_{rank}.pt dict
PROJECTOR_ATTR = "ukd_projector"   # attribute of the DDP wrapper holding the projector (not of .module)
SEED_OFFSET = 7919                 # the graft draws its random numbers from seed + this, never from the host's stream
REQUIRED_KEYS = ("embedding_size", "fp16", "batch_size", "gradient_acc", "output", "frequent", "kd")
# keys our plugin reads that upstream configs lack, with upstream's behaviour as the default
PLUGIN_DEFAULTS = {"input_size": 112, "sampler": "random", "val_targets": [], "rec": "", "val_batch_size": 64,
                   "seed": 2048}


def kd_enabled(cfg):
    """What the patch tests: cfg.kd exists, is a dict and says enabled=True (upstream configs have no kd key)."""
    kd = cfg.get("kd") if isinstance(cfg, dict) else getattr(cfg, "kd", None)
    return isinstance(kd, dict) and bool(kd.get("enabled", False))


def plugin_config(cfg):
    """A shallow copy of upstream's cfg with the keys our plugin reads; upstream's cfg itself is not touched."""
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ConfigError(f"ukd_graft: the training config lacks {', '.join(missing)}; expected an arcface_torch "
                          "config (configs/base.py + job file) with a `config.kd = edict(enabled=True, ...)` section")
    view = edict(dict(cfg))
    for key, default in PLUGIN_DEFAULTS.items():
        if view.get(key) is None:
            view[key] = default
    return view


def _expect_ddp_student(backbone):
    student = getattr(backbone, "module", None)
    if not isinstance(backbone, torch.nn.Module) or not isinstance(student, torch.nn.Module):
        raise ConfigError(
            "ukd_graft: expected `backbone` to be the DistributedDataParallel-wrapped student "
            "(train_v2.py: `backbone = torch.nn.parallel.DistributedDataParallel(module=backbone, ...)`), got "
            f"{type(backbone).__name__}. The UKD lines must come right after `backbone._set_static_graph()`.")
    if hasattr(backbone, PROJECTOR_ATTR):
        raise ConfigError(f"ukd_graft: the backbone already carries a '{PROJECTOR_ATTR}': the graft was built twice")
    if next(student.parameters(), None) is None:
        raise ConfigError("ukd_graft: the student backbone has no parameters")
    return student


class UKDGraft:
    """Our UKD plugin driven from upstream's train_v2.py loop (see the module docstring for the call sites)."""

    def __init__(self, cfg, backbone, rank=0, world_size=1, local_rank=0, writer=None):
        student = _expect_ddp_student(backbone)
        if not kd_enabled(cfg):
            raise ConfigError("ukd_graft: cfg.kd.enabled is not True; the patched train_v2.py builds the graft only "
                              "when it is")
        self.cfg = plugin_config(cfg)  # a copy: upstream's cfg object is left as it is
        self.rank, self.world_size, self.local_rank = int(rank), int(world_size), int(local_rank)
        self.writer = writer
        self.gradient_acc = max(1, int(self.cfg.gradient_acc))
        self.embedding_size = int(self.cfg.embedding_size)
        self.device = next(student.parameters()).device
        self.backbone = backbone
        self._optimizer_checked = False
        self._last_batch = None
        self._window = TermWindow()

        forked = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(int(self.cfg.seed) + SEED_OFFSET)
            self.plugin = UKDPlugin(self.cfg)
            self.plugins = PluginDriver([self.plugin])
            self.projector = self.plugin.projector
            if self.plugins.head_users:
                raise ConfigError("ukd_graft: a configured KD term changes the classification head (class centres or "
                                  "margins), which needs this project's Partial FC; upstream's train_v2.py runs its "
                                  "own. Train it with tools/train.py, or drop that term from kd.losses")
            self.plugins.attach(self._wrap, self.device)
            self.plugins.before_training(TrainContext(
                cfg=self.cfg, backbone=student, device=self.device, rank=self.rank, world_size=self.world_size,
                output=str(self.cfg.output)))
        if self.plugins.trainable:
            # A submodule of the DDP wrapper, not of .module: backbone.parameters() (optimizer group 0, the
            # clip_grad_norm_ call) includes it, backbone.module.state_dict() (model.pt) does not.
            setattr(backbone, PROJECTOR_ATTR, self.plugins.trainable[0])

    def _wrap(self, module):
        if self.world_size <= 1 or not torch.distributed.is_initialized():
            return module
        kwargs = {}  # a Linear projector has no buffers to broadcast
        if self.device.type == "cuda":
            kwargs["device_ids"] = [self.device.index]
        return torch.nn.parallel.DistributedDataParallel(module, **kwargs)

    @property
    def teacher(self):
        return self.plugin.teacher

    # ---- per micro-step --------------------------------------------------------------------------------
    def add_kd_terms(self, loss, img, local_embeddings, local_labels, global_step):
        """loss + the weighted KD terms of this micro-step; upstream scales, clips and steps the sum as before."""
        self._check_step_inputs(loss, img, local_embeddings, local_labels)
        images = img if img.device == self.device else img.to(self.device, non_blocking=True)
        labels = local_labels.reshape(-1).to(device=self.device, dtype=torch.long)
        # upstream counts micro-steps from 1; the plugin wants the 0-based optimizer step (ramps, random negatives)
        step = (int(global_step) - 1) // self.gradient_acc
        batch = StepBatch(images=images, labels=labels, embeddings=local_embeddings, step=step)
        terms = self.plugins.loss_terms(batch)
        self._last_batch = batch
        total = loss
        for value in terms.values():
            total = total + value
        self._window.add({"cls": loss, **terms})  # logged as the engine logs them: loss/cls, loss/kd/<term>
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        return total

    def _check_step_inputs(self, loss, img, emb, labels):
        where = ("ukd_graft.add_kd_terms (train_v2.py, right after `loss = module_partial_fc(local_embeddings, "
                 "local_labels)`)")
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ConfigError(f"{where}: expected the scalar Partial FC loss, got "
                              f"{type(loss).__name__}{list(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        if not isinstance(img, torch.Tensor) or img.dim() != 4:
            raise ConfigError(f"{where}: expected img [batch, 3, H, W], got "
                              f"{list(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__}")
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[1] != self.embedding_size \
                or emb.shape[0] != img.shape[0]:
            raise ConfigError(f"{where}: expected local_embeddings [{img.shape[0]}, cfg.embedding_size="
                              f"{self.embedding_size}] for img {list(img.shape)}, got "
                              f"{list(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__}")
        if not isinstance(labels, torch.Tensor) or labels.numel() != img.shape[0]:
            raise ConfigError(f"{where}: expected {img.shape[0]} local_labels, got "
                              f"{labels.numel() if isinstance(labels, torch.Tensor) else type(labels).__name__}")

    def after_step(self, global_step, opt):
        """After lr_scheduler.step(): bank updates once per optimizer step (upstream's `global_step % gradient_acc`
        test), then the KD log line every cfg.frequent steps on rank 0."""
        if not self._optimizer_checked:
            self._check_optimizer(opt)
        global_step = int(global_step)
        if global_step % self.gradient_acc == 0 and self._last_batch is not None:
            self.plugins.after_step(self._last_batch)
        frequent = int(self.cfg.frequent)
        if frequent > 0 and global_step % frequent == 0 and self._window.count:
            self._log(global_step)

    def _check_optimizer(self, opt):
        if not isinstance(opt, torch.optim.Optimizer) or not opt.param_groups:
            raise ConfigError(f"ukd_graft.after_step: expected upstream's `opt` (a torch optimizer), got "
                              f"{type(opt).__name__}")
        if self.projector is not None:
            first = {id(p) for p in opt.param_groups[0]["params"]}
            if not all(id(p) in first for p in self.projector.parameters()):
                raise ConfigError(
                    "ukd_graft: the KD projector is not in the optimizer's first param group, so it would never "
                    "be trained: the graft must be built before `opt = torch.optim.SGD/AdamW(params=[{'params': "
                    "backbone.parameters()}, ...])` (right after `backbone._set_static_graph()` in train_v2.py)")
        self._optimizer_checked = True

    def _log(self, global_step):
        values = log_scalars(self._window.take())
        values.update(self.plugins.scalars())
        if self.rank != 0:
            return
        shown = "  ".join(f"{name} {value:.4f}" for name, value in values.items()
                          if name.startswith("loss/") or name == "kd/teacher_ms")
        log.info(f"UKD global_step {global_step}: {shown}")
        if self.writer is not None:  # everything, incl. unweighted terms, weights and mining statistics
            for name, value in values.items():
                self.writer.add_scalar(name, value, global_step)

    # ---- checkpoint ------------------------------------------------------------------------------------
    def state_dict(self):
        """The 'state_ukd' entry: plugin state (projector, memory banks) and what the teacher was. Plain
        containers and tensors only, so upstream's torch.load (weights_only by default) reads it."""
        kd = self.plugin.kd
        return {"plugin": self.plugin.state_dict(), "teacher_network": str(kd.teacher_network),
                "teacher_weights": str(kd.teacher_weights),
                "teacher_embedding_size": int(kd.teacher_embedding_size)}

    def load_state(self, checkpoint):
        path = os.path.join(str(self.cfg.output), f"checkpoint_gpu_{self.rank}.pt")
        if not isinstance(checkpoint, dict) or STATE_KEY not in checkpoint:
            raise CheckpointError(
                f"resume with kd enabled: {path} has no '{STATE_KEY}' entry (it was written without the UKD graft "
                "or with kd disabled). Resume it with kd disabled, or start the KD run afresh (resume=False).")
        state = checkpoint[STATE_KEY]
        plugin_state = state.get("plugin") if isinstance(state, dict) else None
        if not isinstance(plugin_state, dict) or "composer" not in plugin_state:
            raise CheckpointError(f"resume: '{STATE_KEY}' in {path} is not a UKD graft state (no plugin/composer)")
        saved_projector = plugin_state.get("projector") is not None
        if saved_projector != (self.projector is not None):
            raise CheckpointError(
                f"resume: {path} was written {'with' if saved_projector else 'without'} a KD projector, but this run "
                f"{'has' if self.projector is not None else 'has none'} (cfg.embedding_size={self.embedding_size}, "
                f"kd.teacher_embedding_size={self.plugin.kd.teacher_embedding_size}, kd.projector="
                f"{self.plugin.kd.projector!r}); the optimizer state would not line up either")
        if state.get("teacher_network") != str(self.plugin.kd.teacher_network):
            log.warning(f"UKD resume: {path} was trained with teacher {state.get('teacher_network')}, this run uses "
                        f"{self.plugin.kd.teacher_network}")
        try:
            self.plugin.load_state_dict(plugin_state)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"resume: '{STATE_KEY}' in {path} does not fit this KD config: {exc}") from exc
