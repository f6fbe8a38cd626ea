"""The training loop: arcface_torch's train_v2.py flow, made testable, resumable and plugin-aware.

One optimizer step = gradient_acc micro-steps. Per micro-step (`_micro_step`): student forward -> Partial FC
loss -> the plugins' terms -> backward of (total / gradient_acc), without DDP sync until the last micro-step.
Per optimizer step (`_end_of_step`): unscale -> clip -> optimizer -> LR schedule -> plugins' after_step ->
log line -> verification -> checkpoint. The pieces: MixedPrecision (precision.py) hides the grad scaler,
TrainSchedule (schedule.py) the step counts, PluginDriver (plugin_driver.py) the plugin hooks.
"""
import contextlib
import inspect
import os

import torch
from torch.nn.parallel import DistributedDataParallel

from . import distributed as D
from .checkpoint import (atomic_save, checkpoint_path, load_checkpoint, remove_orphans, rng_state,
                         save_generation, set_rng_state)
from .device import configure_threads, pick_device, seed_everything
from .hooks import StepBatch, TrainContext
from .logging import TrainLogger, init_logging
from .plugin_driver import PluginDriver, TermWindow, log_scalars
from .plugins import build_plugins
from .precision import MixedPrecision, autocast_for
from .schedule import TrainSchedule
from .wandb_run import WandbRun
from .scheduler import PolynomialLRWarmup
from ..errors import CheckpointError, DistributedError, TrainingDiverged
from ..losses import CombinedMarginLoss
from ..partial_fc import PartialFC_V2


def build_backbone(cfg, autocast=None):
    """The student; `autocast` (default: cfg.fp16) is what its forward does (see precision.autocast_for)."""
    from ..backbones import get_model
    return get_model(cfg.network, dropout=0.0, fp16=cfg.fp16 if autocast is None else autocast,
                     num_features=cfg.embedding_size, input_size=cfg.input_size, **dict(cfg.network_kwargs))


def optimizer_kind(state):
    """'sgd' or 'adamw' from an optimizer state_dict (checkpoints of earlier versions do not name it), or None."""
    for entry in (state or {}).get("state", {}).values():
        if "exp_avg" in entry:
            return "adamw"
        if "momentum_buffer" in entry:
            return "sgd"
    return None


def build_optimizer(cfg, student_params, pfc):
    groups = [{"params": student_params}, {"params": list(pfc.parameters())}]  # Partial FC last, as upstream
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Trainer:
    def __init__(self, cfg, train_loader=None):
        self.cfg = cfg
        self.train_loader = train_loader
        self.history = []  # (global_step, loss) on rank 0, for tests and the demo

    # ------------------------------------------------------------------ setup
    def setup(self):
        cfg = self.cfg
        self.device = pick_device(cfg)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.rank, self.world_size = D.init_distributed(cfg.dist_backend, self.device.type, cfg.dist_timeout)
        seed_everything(cfg.seed)
        self.log = init_logging(self.rank, cfg.output)
        os.makedirs(cfg.output, exist_ok=True)
        if self.rank == 0:
            for name in remove_orphans(cfg.output):
                self.log.warning(f"removed {os.path.join(cfg.output, name)}, left by a checkpoint write that was killed")
            if cfg.save_every_steps and not cfg.save_all_states:
                self.log.warning(f"save_every_steps={cfg.save_every_steps} writes only model.pt while save_all_states="
                                 "False: nothing resumable; set save_all_states=True to be able to resume")
        self.last_good = None  # (path, global step) of the newest checkpoint worth resuming from
        self._probe = None     # the last micro-batch, to check that the weights about to be saved are sound
        self.threads = configure_threads(cfg.num_threads, D.get_local_world_size())
        self.autocast, self.precision_note = autocast_for(cfg.fp16, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as upstream: fixed input sizes, fastest kernels

        if self.train_loader is None:
            from ..data.loader import get_dataloader
            self.train_loader = get_dataloader(cfg, self.rank, self.world_size, self.device)
        self.schedule = TrainSchedule.from_config(cfg, len(self.train_loader), self.world_size)

        self.backbone = build_backbone(cfg, self.autocast).to(self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.backbone = self.backbone.to(memory_format=self.memory_format)
        if cfg.pretrained_backbone:
            from ..backbones.loading import load_backbone_weights
            load_backbone_weights(self.backbone, cfg.pretrained_backbone, strict=True, what="pretrained_backbone")
            self.log.info(f"backbone initialised from {cfg.pretrained_backbone}")

        self.plugins = PluginDriver(build_plugins(cfg))
        self.ddp = self._wrap(self.backbone)
        plugin_params = self.plugins.attach(self._wrap, self.device)
        self.clip_params = list(self.backbone.parameters()) + [p for m in self.plugins.trainable
                                                               for p in m.parameters()]

        margin = CombinedMarginLoss(cfg.margin_scale, *cfg.margin_list, cfg.interclass_filtering_threshold,
                                    margin_gradient=cfg.margin_gradient)
        self.pfc = PartialFC_V2(margin, cfg.embedding_size, cfg.num_classes, cfg.sample_rate, fp16=False,
                                sample_seed=cfg.seed).to(self.device)
        self.plugins.configure_head(self.pfc)
        self.head_hooks = bool(self.plugins.head_users)
        student_params = [p for p in list(self.backbone.parameters()) + plugin_params if p.requires_grad]
        self.optimizer = build_optimizer(cfg, student_params, self.pfc)
        self.lr_scheduler = PolynomialLRWarmup(self.optimizer, self.schedule.warmup_step, self.schedule.total_step)
        self.precision = MixedPrecision(cfg.fp16, self.device)
        self.wandb = WandbRun.start(cfg, self.rank)

        self.start_epoch, self.start_batch, self.global_step = 0, 0, 0
        rng = self._resume() if cfg.resume else None

        self.writer = None
        if self.rank == 0 and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=os.path.join(cfg.output, "tensorboard"))
        self.logger = TrainLogger(cfg.frequent, self.schedule.total_step, cfg.batch_size, self.world_size,
                                  start_step=self.global_step, writer=self.writer, rank=self.rank)
        self.window = TermWindow()
        self.verification = self._build_verification()
        self.plugins.before_training(TrainContext(
            cfg=cfg, backbone=self.backbone, device=self.device, rank=self.rank, world_size=self.world_size,
            train_loader=self.train_loader, output=cfg.output, schedule=self.schedule))
        if self.rank == 0:
            for key in sorted(cfg):
                self.log.info(f": {key:<32}{cfg[key]}")
            self.log.info(f"world_size {self.world_size}, device {self.device}, {self.schedule.describe()}, "
                          f"starting at step {self.global_step}")
            self.log.info(f"precision: {self.precision_note}; torch threads per process: {self.threads[0]} "
                          f"({self.threads[1]})")
            m1, m2, m3 = cfg.margin_list
            if m3 > 0 and (m1 != 1 or m2 != 0):
                self.log.warning(f"margin_list {tuple(cfg.margin_list)}: this engine applies cos(m1*theta + m2) - m3; "
                                 "arcface_torch would apply only the CosFace margin m3 and ignore m1 and m2")
        # Last, so that nothing built during set-up (a teacher's random init, say) shifts the restored streams.
        set_rng_state(rng)

    def _wrap(self, module):
        if self.world_size == 1:
            return module
        # upstream's broadcast_buffers=False: BN statistics stay per rank (renamed in recent torch)
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        kwargs = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False,
                  "bucket_cap_mb": 16}
        if self.device.type == "cuda":
            kwargs["device_ids"] = [self.device.index]
        ddp = DistributedDataParallel(module, **kwargs)
        if self.device.type == "cuda" and self.cfg.fp16:  # as upstream: gradients travel as fp16 between GPUs
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
            ddp.register_comm_hook(None, fp16_compress_hook)
        return ddp

    def _build_verification(self):
        cfg = self.cfg
        if not cfg.val_targets or cfg.rec == "synthetic":
            return None
        from ..eval.callback import VerificationCallback
        return VerificationCallback(cfg.val_targets, cfg.rec, summary_writer=self.writer,
                                    input_size=cfg.input_size, batch_size=cfg.val_batch_size)

    def _resume(self):
        """Restore every state from this rank's checkpoint; returns the RNG states, set once set-up is done."""
        cfg = self.cfg
        ckpt = load_checkpoint(cfg.output, self.rank, self.world_size, cfg.num_classes, cfg.resume_unsafe_pickle)
        path = checkpoint_path(cfg.output, self.rank)
        saved = ckpt.get("optimizer") or optimizer_kind(ckpt["state_optimizer"])
        if saved is not None and saved != cfg.optimizer:
            raise CheckpointError(f"resume: {path} was trained with optimizer={saved!r} but the config says "
                                  f"{cfg.optimizer!r}: its optimizer state does not fit another optimizer; set "
                                  f"optimizer={saved!r}, or start afresh from its weights with pretrained_backbone")
        try:
            self.backbone.load_state_dict(ckpt["state_dict_backbone"])
            self.pfc.load_state_dict(ckpt["state_dict_softmax_fc"])
            self.optimizer.load_state_dict(ckpt["state_optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"resume: {path} does not match the configured network/optimizer: {exc}") from exc
        if ckpt.get("state_lr_scheduler"):
            self.lr_scheduler.load_state_dict(ckpt["state_lr_scheduler"])
            self._apply_schedule_changes()
        self.precision.load_state_dict(ckpt.get("state_grad_scaler"))
        self.plugins.load_state_dict(ckpt.get("state_plugins", {}), f"resume: {path}")
        self.start_epoch = int(ckpt["epoch"])
        self.start_batch = int(ckpt.get("batch_in_epoch", 0))
        self.global_step = int(ckpt["global_step"])
        self.pfc.last_batch_size = 0
        self.last_good = (path, self.global_step)
        self.log.info(f"resumed from {path}: epoch {self.start_epoch}, batch {self.start_batch}, "
                      f"global step {self.global_step}")
        return ckpt.get("rng")

    def _apply_schedule_changes(self):
        """A resume whose config changed lr, num_epoch or max_steps follows the new values from here on, and says
        so (the saved scheduler would silently keep the old curve)."""
        sched, new = self.lr_scheduler, self.schedule
        old = (sched.base_lrs[0], sched.warmup_iters, sched.total_iters)
        now = (float(self.cfg.lr), new.warmup_step, max(new.total_step, 1))
        if old == now:
            return
        sched.retarget(*now)
        self.log.warning(f"resume: the config changes the schedule (lr {old[0]} -> {now[0]}, warmup steps {old[1]} -> "
                         f"{now[1]}, total steps {old[2]} -> {now[2]}); continuing from step {sched.last_epoch} "
                         f"on the new curve (lr now {sched.get_last_lr()[0]:.6g})")

    # ------------------------------------------------------------------ saving
    def save(self, epoch, batch_in_epoch):
        """A checkpoint generation of every rank, and model.pt; only of weights that are sound (see _sound)."""
        cfg = self.cfg
        if not self._sound():
            raise TrainingDiverged(
                f"training diverged: after global step {self.global_step} the weights are not finite or give a "
                f"non-finite loss, so they were not saved; {self._last_good_text()}. Try a lower lr, "
                "clip_grad_norm > 0, or fp16=False")
        if cfg.save_all_states:
            state = {
                "epoch": epoch, "global_step": self.global_step, "batch_in_epoch": batch_in_epoch,
                "state_dict_backbone": self.backbone.state_dict(),
                "state_dict_softmax_fc": self.pfc.state_dict(),
                "state_optimizer": self.optimizer.state_dict(),
                "state_lr_scheduler": self.lr_scheduler.state_dict(),
                "state_grad_scaler": self.precision.state_dict(),
                "state_plugins": self.plugins.state_dict(),
                "rng": rng_state(),
                "world_size": self.world_size, "num_classes": cfg.num_classes, "network": cfg.network,
                "optimizer": cfg.optimizer,
            }
            save_generation(state, cfg.output, self.rank, self.global_step)
            self.last_good = (checkpoint_path(cfg.output, self.rank), self.global_step)
        if self.rank == 0:
            atomic_save(self.backbone.state_dict(), os.path.join(cfg.output, "model.pt"))
        D.barrier()

    def _sound(self):
        """Finite parameters, and a finite embedding and margin loss on the last micro-batch in eval mode (no
        statistics change): weights a step has blown up to 1e28 are finite but give NaN at once, and a
        checkpoint of them would only diverge again on resume. Collective: every rank decides alike."""
        params = list(self.backbone.parameters()) + list(self.pfc.parameters()) + \
            [p for m in self.plugins.trainable for p in m.parameters()]
        bad = not all(bool(torch.isfinite(p).all()) for p in params)
        if self._probe is not None:
            images, labels = self._probe
            training = self.backbone.training
            self.backbone.eval()
            try:
                with torch.no_grad():
                    emb = self.backbone(images)
                    loss = self.pfc(emb, labels, step=0)
            finally:
                self.backbone.train(training)
            bad = bad or not (bool(torch.isfinite(emb).all()) and bool(torch.isfinite(loss)))
        flag = torch.tensor([1.0 if bad else 0.0], device=self.device)
        return D.all_reduce_max(flag).item() == 0

    def _last_good_text(self):
        if self.last_good is not None:
            return f"the last good checkpoint is {self.last_good[0]} (global step {self.last_good[1]})"
        if not self.cfg.save_all_states:
            return "no resumable checkpoint exists (save_all_states=False)"
        return "no checkpoint has been written yet"

    # ------------------------------------------------------------------ loop
    def train(self):
        self.setup()
        epoch, done = self.start_epoch, self.global_step >= self.schedule.total_step
        while not done:
            batch_idx = self._run_epoch(epoch, self.start_batch if epoch == self.start_epoch else 0)
            epoch_complete = batch_idx >= self.schedule.batches_used_per_epoch
            epoch += int(epoch_complete)
            done = self.global_step >= self.schedule.total_step or \
                (self.schedule.num_epoch > 0 and epoch >= self.schedule.num_epoch)
            self.save(epoch, 0 if epoch_complete else batch_idx)
            if epoch_complete and self.wandb is not None and self.rank == 0:
                self.wandb.log_model(os.path.join(self.cfg.output, "model.pt"), f"E{epoch - 1}")
            if getattr(self.train_loader, "bad_records", 0):
                self.log.warning(f"{self.train_loader.bad_records} bad records skipped so far")
        if self.verification is not None:
            self._verify()
        if self.wandb is not None and self.rank == 0:
            self.wandb.log_model(os.path.join(self.cfg.output, "model.pt"), "Final")
        return self

    def _verify(self):
        results = self.verification(self.global_step, self.backbone)  # restores train mode itself
        if self.wandb is not None:
            self.wandb.log_verification(results, self.global_step)

    def _run_epoch(self, epoch, start_batch):
        """Optimizer steps until the epoch or the schedule ends; returns the batch index reached."""
        self.train_loader.set_epoch(epoch, start_batch)
        batch_idx = start_batch
        for batch in self.train_loader:
            if batch_idx >= self.schedule.batches_used_per_epoch:
                break
            micro = (batch_idx - start_batch) % self.schedule.gradient_acc
            step_batch = self._micro_step(batch, micro)
            batch_idx += 1
            if micro == self.schedule.gradient_acc - 1:
                self._end_of_step(step_batch, epoch, batch_idx)
                if self.global_step >= self.schedule.total_step:
                    break
        return batch_idx

    def _micro_step(self, batch, micro):
        """Forward and backward of micro-batch `micro` of this optimizer step; returns the plugins' view of it."""
        acc = self.schedule.gradient_acc
        images = batch.images.contiguous(memory_format=self.memory_format)
        self._probe = (images, batch.labels)
        with self._sync_unless(micro == acc - 1):
            embeddings = self.ddp(images)
            step_batch = StepBatch(images=images, labels=batch.labels, embeddings=embeddings,
                                   step=self.global_step, index=batch.index, flip=batch.flip)
            plugin_terms = self.plugins.loss_terms(step_batch)
            if self.head_hooks:
                self.plugins.before_head(self.pfc, step_batch)
            # Partial FC's negatives are a function of this counter: one draw per micro-step, restored on resume
            loss_cls = self.pfc(embeddings, batch.labels, step=self.global_step * acc + micro)
            terms = {"cls": loss_cls, **plugin_terms}
            loss = sum(terms.values())
            self._check_finite(loss, terms)
            self.precision.backward(loss / acc)
        self.window.add(terms)
        return step_batch

    def _end_of_step(self, step_batch, epoch, batch_idx):
        """The optimizer step and what follows it, in upstream's order, then this engine's extras."""
        cfg = self.cfg
        self.precision.step(self.optimizer, self.clip_params, cfg.clip_grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.plugins.after_step(step_batch)
        self.global_step += 1

        means = self.window.take()
        scalars = log_scalars(means)
        scalars.update(self.plugins.scalars())
        self.logger.update(means["cls"], scalars)
        if self.rank == 0:
            self.history.append((self.global_step, sum(means.values())))
        lr = self.optimizer.param_groups[0]["lr"]
        self.logger(self.global_step, epoch, lr, self.precision.scale, self.schedule.gradient_acc)
        if self.wandb is not None:
            self.wandb.log_step(means["cls"], self.logger.loss.avg, self.global_step, epoch, lr)
        if self.verification is not None and self.global_step % cfg.verbose == 0:
            self._verify()
        if (cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0
                and batch_idx < self.schedule.batches_used_per_epoch):
            self.save(epoch, batch_idx)

    def _sync_unless(self, last_micro):
        """DDP gradient sync on the last micro-step only (no_sync before it), for the student and plugin modules."""
        if last_micro or self.world_size == 1:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for m in [self.ddp] + self.plugins.trainable:
            if isinstance(m, DistributedDataParallel):
                stack.enter_context(m.no_sync())
        return stack

    def _check_finite(self, loss, terms):
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=self.device)
        D.all_reduce_max(bad)
        if bad.item() > 0:
            parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
            raise TrainingDiverged(
                f"loss is not finite at global step {self.global_step} ({parts}); training stopped before the "
                f"update; {self._last_good_text()}. Try a lower lr, fp16=False, or clip_grad_norm > 0")

    def close(self, failed=False):
        if getattr(self, "writer", None) is not None:
            self.writer.close()
        if getattr(self, "wandb", None) is not None:
            self.wandb.finish()
        self.ddp = None
        if getattr(self, "plugins", None) is not None:
            self.plugins.detach()
        D.teardown(failed)


def train(cfg, train_loader=None):
    trainer = Trainer(cfg, train_loader)
    try:
        trainer.train()
    except BaseException as exc:
        trainer.close(failed=True)
        if D.is_timeout(exc):
            raise DistributedError(
                f"rank {D.get_rank()}: a collective did not complete within dist_timeout={cfg.dist_timeout} s at "
                f"global step {getattr(trainer, 'global_step', 0)}: another rank has stopped, died or fallen far "
                f"behind ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
        raise
    trainer.close()
    return trainer
