"""The training loop: arcface_torch's train_v2.py flow, made testable, resumable and plugin-aware.

One optimizer step = gradient_acc micro-steps. Per micro-step: student forward -> Partial FC loss ->
plugin.after_forward terms -> (total / gradient_acc).backward() (no DDP sync until the last micro-step).
Per optimizer step: unscale -> clip -> optimizer -> scheduler -> plugin.after_step -> log / verify / save.
"""
import contextlib
import inspect
import os

import torch
from torch.nn.parallel import DistributedDataParallel

from . import distributed as D
from .checkpoint import atomic_save, checkpoint_path, load_checkpoint, rng_state, set_rng_state
from .hooks import StepBatch, TrainContext
from .logging import TrainLogger, init_logging
from .scheduler import PolynomialLRWarmup
from ..errors import CheckpointError, ConfigError, TrainingDiverged
from ..losses import CombinedMarginLoss
from ..partial_fc import PartialFC_V2


def pick_device(cfg):
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but CUDA is not available")
        return torch.device("cuda", D.get_local_rank())
    return torch.device("cpu")


def seed_everything(seed):
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def build_backbone(cfg):
    from ..backbones import get_model
    return get_model(cfg.network, dropout=0.0, fp16=cfg.fp16, num_features=cfg.embedding_size,
                     input_size=cfg.input_size, **dict(cfg.network_kwargs))


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
        self.rank, self.world_size = D.init_distributed(cfg.dist_backend, self.device.type)
        seed_everything(cfg.seed)
        self.log = init_logging(self.rank, cfg.output)
        os.makedirs(cfg.output, exist_ok=True)

        if self.train_loader is None:
            from ..data.loader import get_dataloader
            self.train_loader = get_dataloader(cfg, self.rank, self.world_size, self.device)
        batches_per_epoch = len(self.train_loader)
        if batches_per_epoch < cfg.gradient_acc:
            raise ConfigError(f"only {batches_per_epoch} batches per epoch per rank, fewer than gradient_acc="
                              f"{cfg.gradient_acc}; use a smaller batch_size or more data")
        self.steps_per_epoch = batches_per_epoch // cfg.gradient_acc
        cfg.total_batch_size = cfg.batch_size * self.world_size
        cfg.warmup_step = int(self.steps_per_epoch * max(cfg.warmup_epoch, 0))
        cfg.total_step = int(self.steps_per_epoch * cfg.num_epoch)
        if cfg.max_steps:
            cfg.total_step = min(cfg.total_step, int(cfg.max_steps)) if cfg.num_epoch else int(cfg.max_steps)

        self.backbone = build_backbone(cfg).to(self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.backbone = self.backbone.to(memory_format=self.memory_format)
        if cfg.pretrained_backbone:
            from ..backbones.loading import load_backbone_weights
            load_backbone_weights(self.backbone, cfg.pretrained_backbone, strict=True, what="pretrained_backbone")
            self.log.info(f"backbone initialised from {cfg.pretrained_backbone}")

        from plugins.registry import build_plugins
        self.plugins = build_plugins(cfg)
        self.ddp = self._wrap(self.backbone)
        student_params = list(self.backbone.parameters())
        self.plugin_modules = []
        for plugin in self.plugins:
            modules = [m.to(self.device) for m in plugin.trainable_modules()]
            wrapped = [self._wrap(m) for m in modules]
            plugin.bind_trainable(wrapped)
            self.plugin_modules += wrapped
            for m in modules:
                student_params += [p for p in m.parameters() if p.requires_grad]

        margin = CombinedMarginLoss(cfg.margin_scale, *cfg.margin_list, cfg.interclass_filtering_threshold)
        self.pfc = PartialFC_V2(margin, cfg.embedding_size, cfg.num_classes, cfg.sample_rate,
                                fp16=False).to(self.device)
        self.optimizer = build_optimizer(cfg, [p for p in student_params if p.requires_grad], self.pfc)
        self.scheduler = PolynomialLRWarmup(self.optimizer, cfg.warmup_step, cfg.total_step)
        self.amp = cfg.fp16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", growth_interval=100) if self.amp else None

        self.start_epoch, self.start_batch, self.global_step = 0, 0, 0
        if cfg.resume:
            self._resume()

        self.writer = None
        if self.rank == 0 and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=os.path.join(cfg.output, "tensorboard"))
        self.logger = TrainLogger(cfg.frequent, cfg.total_step, cfg.batch_size, self.world_size,
                                  start_step=self.global_step, writer=self.writer, rank=self.rank)
        self.verification = self._build_verification()
        ctx = TrainContext(cfg=cfg, backbone=self.backbone, device=self.device, rank=self.rank,
                           world_size=self.world_size, train_loader=self.train_loader, output=cfg.output)
        for plugin in self.plugins:
            plugin.before_training(ctx)
        if self.rank == 0:
            for key in sorted(cfg):
                if key != "kd":
                    self.log.info(f": {key:<32}{cfg[key]}")
            self.log.info(f"world_size {self.world_size}, device {self.device}, {self.steps_per_epoch} steps/epoch, "
                          f"{cfg.total_step} steps in total, starting at step {self.global_step}")

    def _wrap(self, module):
        if self.world_size == 1:
            return module
        # upstream's broadcast_buffers=False: BN statistics stay per rank (renamed in recent torch)
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        kwargs = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False,
                  "bucket_cap_mb": 16}
        if self.device.type == "cuda":
            kwargs["device_ids"] = [self.device.index]
        return DistributedDataParallel(module, **kwargs)

    def _build_verification(self):
        cfg = self.cfg
        if not cfg.val_targets or cfg.rec == "synthetic":
            return None
        from ..eval.callback import VerificationCallback
        return VerificationCallback(cfg.val_targets, cfg.rec, summary_writer=self.writer,
                                    input_size=cfg.input_size, batch_size=cfg.val_batch_size)

    def _resume(self):
        ckpt = load_checkpoint(self.cfg.output, self.rank, self.world_size, self.cfg.num_classes)
        try:
            self.backbone.load_state_dict(ckpt["state_dict_backbone"])
            self.pfc.load_state_dict(ckpt["state_dict_softmax_fc"])
            self.optimizer.load_state_dict(ckpt["state_optimizer"])
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f"resume: {checkpoint_path(self.cfg.output, self.rank)} does not match the "
                                  f"configured network/optimizer: {exc}") from exc
        if ckpt.get("state_lr_scheduler"):
            self.scheduler.load_state_dict(ckpt["state_lr_scheduler"])
        if self.scaler is not None and ckpt.get("state_grad_scaler"):
            self.scaler.load_state_dict(ckpt["state_grad_scaler"])
        states = ckpt.get("state_plugins", {})
        for plugin in self.plugins:
            if plugin.name in states:
                plugin.load_state_dict(states[plugin.name])
        set_rng_state(ckpt.get("rng"))
        self.start_epoch = int(ckpt["epoch"])
        self.start_batch = int(ckpt.get("batch_in_epoch", 0))
        self.global_step = int(ckpt["global_step"])
        self.pfc.last_batch_size = 0
        self.log.info(f"resumed from {checkpoint_path(self.cfg.output, self.rank)}: epoch {self.start_epoch}, "
                      f"batch {self.start_batch}, global step {self.global_step}")

    # ------------------------------------------------------------------ saving
    def save(self, epoch, batch_in_epoch):
        cfg = self.cfg
        if cfg.save_all_states:
            state = {
                "epoch": epoch, "global_step": self.global_step, "batch_in_epoch": batch_in_epoch,
                "state_dict_backbone": self.backbone.state_dict(),
                "state_dict_softmax_fc": self.pfc.state_dict(),
                "state_optimizer": self.optimizer.state_dict(),
                "state_lr_scheduler": self.scheduler.state_dict(),
                "state_grad_scaler": self.scaler.state_dict() if self.scaler else None,
                "state_plugins": {p.name: p.state_dict() for p in self.plugins},
                "rng": rng_state(),
                "world_size": self.world_size, "num_classes": cfg.num_classes, "network": cfg.network,
            }
            atomic_save(state, checkpoint_path(cfg.output, self.rank))
        if self.rank == 0:
            atomic_save(self.backbone.state_dict(), os.path.join(cfg.output, "model.pt"))
        D.barrier()

    # ------------------------------------------------------------------ loop
    def _sync_context(self, last_micro):
        if last_micro or self.world_size == 1:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for m in [self.ddp] + self.plugin_modules:
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
                f"update, the last checkpoint in {self.cfg.output} is intact. Try a lower lr, fp16=False, or "
                "clip_grad_norm > 0")

    def train(self):
        self.setup()
        cfg = self.cfg
        clip_params = list(self.backbone.parameters()) + [p for m in self.plugin_modules for p in m.parameters()]
        acc = cfg.gradient_acc
        self.ddp.train()  # the wrapped backbone too
        done = self.global_step >= cfg.total_step
        epoch = self.start_epoch
        batches_this_epoch = self.steps_per_epoch * acc  # a tail shorter than gradient_acc is left out
        while not done:
            start_batch = self.start_batch if epoch == self.start_epoch else 0
            self.train_loader.set_epoch(epoch, start_batch)
            batch_idx = start_batch
            micro = 0
            window = {}
            for batch in self.train_loader:
                if batch_idx >= batches_this_epoch:
                    break
                last_micro = (micro + 1) == acc
                if self.memory_format is torch.channels_last:
                    batch.images = batch.images.contiguous(memory_format=torch.channels_last)
                with self._sync_context(last_micro):
                    embeddings = self.ddp(batch.images)
                    loss_cls = self.pfc(embeddings, batch.labels)
                    step_batch = StepBatch(images=batch.images, labels=batch.labels, embeddings=embeddings,
                                           step=self.global_step, index=getattr(batch, "index", None),
                                           flip=getattr(batch, "flip", None))
                    terms = {"cls": loss_cls}
                    for plugin in self.plugins:
                        terms.update(plugin.after_forward(step_batch))
                    loss = sum(terms.values())
                    self._check_finite(loss, terms)
                    scaled = loss / acc
                    if self.scaler is not None:
                        self.scaler.scale(scaled).backward()
                    else:
                        scaled.backward()
                for k, v in terms.items():
                    window[k] = window.get(k, 0.0) + float(v.detach()) / acc
                micro += 1
                batch_idx += 1
                if not last_micro:
                    continue
                micro = 0
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                if cfg.clip_grad_norm and cfg.clip_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(clip_params, cfg.clip_grad_norm)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                for plugin in self.plugins:
                    plugin.after_step(step_batch)
                self.global_step += 1
                total = sum(window.values())
                scalars = {f"loss/{k}": v for k, v in window.items() if k != "cls" or len(window) > 1}
                for plugin in self.plugins:
                    scalars.update(plugin.scalars())
                self.logger.update(total, scalars)
                if self.rank == 0:
                    self.history.append((self.global_step, total))
                window = {}
                lr = self.optimizer.param_groups[0]["lr"]
                self.logger(self.global_step, epoch, lr, self.scaler.get_scale() if self.scaler else None, acc)
                if self.verification is not None and self.global_step % cfg.verbose == 0 and self.global_step > 0:
                    self.verification(self.global_step, self.backbone)  # restores train mode itself
                if (cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0
                        and batch_idx < batches_this_epoch):
                    self.save(epoch, batch_idx)
                if self.global_step >= cfg.total_step:
                    done = True
                    break
            epoch_complete = batch_idx >= batches_this_epoch
            if epoch_complete:
                epoch += 1
            if epoch >= int(cfg.num_epoch):
                done = True
            self.save(epoch, 0 if epoch_complete else batch_idx)
            bad = getattr(self.train_loader, "bad_records", 0)
            if bad:
                self.log.warning(f"{bad} bad records skipped so far")
        if self.verification is not None:
            self.verification(self.global_step, self.backbone)
        return self

    def close(self):
        if getattr(self, "writer", None) is not None:
            self.writer.close()
        self.ddp = None
        self.plugin_modules = []
        for plugin in getattr(self, "plugins", []):
            plugin.bind_trainable([])
        D.teardown()


def train(cfg, train_loader=None):
    trainer = Trainer(cfg, train_loader)
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer
