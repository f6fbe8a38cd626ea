"""Weights & Biases logging as arcface_torch does it, for configs that set `using_wandb = True`.

Upstream's keys and behaviour: a login with `wandb_key` (not needed offline), a run named
`<yymmdd_HHMM>_GPU<rank>[_<suffix_run_name>]` in `wandb_entity` / `wandb_project` with `notes`, resumed when
`wandb_resume`, on rank 0 only unless `wandb_log_all`; the config, each step's loss ('Loss/Step Loss', 'Loss/Train
Loss', 'Process/Step', 'Process/Epoch', and our 'Process/LearningRate'), the verification accuracies
('Acc/val-Acc2 <set>'), and with `save_artifacts` model.pt after every epoch and at the end. Upstream prints and
ignores a failed login or init; here it is a ConfigError before training starts. `WANDB_MODE=offline` (wandb's
own variable) records everything locally, to be synced later with `wandb sync`. The run's files go to
<output>/wandb (upstream: ./wandb).
"""
import os
from datetime import datetime

from ..errors import ConfigError


class WandbRun:
    def __init__(self, run, name, save_artifacts):
        self.run, self.name, self.save_artifacts = run, name, bool(save_artifacts)

    @classmethod
    def start(cls, cfg, rank):
        """The run of this process, or None (wandb off, or a rank other than 0 without wandb_log_all)."""
        if not cfg.using_wandb or not (rank == 0 or cfg.wandb_log_all):
            return None
        try:
            import wandb
        except ImportError:
            raise ConfigError("using_wandb=True needs the wandb package: pip install 'ukd[wandb]' (or set "
                              "using_wandb=False)") from None
        offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
        if cfg.wandb_key and not offline:
            try:
                wandb.login(key=cfg.wandb_key)
            except Exception as exc:  # wandb raises its own types for bad keys and network failures
                raise ConfigError(f"wandb_key: the Weights & Biases login failed: {exc} (WANDB_MODE=offline logs "
                                  "locally without one)") from exc
        name = datetime.now().strftime("%y%m%d_%H%M") + f"_GPU{rank}"
        if cfg.suffix_run_name:
            name += f"_{cfg.suffix_run_name}"
        try:
            run = wandb.init(entity=cfg.wandb_entity, project=cfg.wandb_project, sync_tensorboard=bool(cfg.tensorboard),
                             resume=cfg.wandb_resume, name=name, notes=cfg.notes, dir=cfg.output)
        except Exception as exc:
            raise ConfigError(f"wandb_entity / wandb_project: Weights & Biases could not start a run in "
                              f"{cfg.wandb_entity}/{cfg.wandb_project}: {exc}") from exc
        run.config.update({key: _plain(value) for key, value in cfg.items()}, allow_val_change=True)
        return cls(run, name, cfg.save_artifacts)

    def log_step(self, step_loss, train_loss, global_step, epoch, lr):
        self.run.log({"Loss/Step Loss": step_loss, "Loss/Train Loss": train_loss, "Process/Step": global_step,
                      "Process/Epoch": epoch, "Process/LearningRate": lr})

    def log_verification(self, results, global_step):
        if results:
            self.run.log({f"Acc/val-Acc2 {name}": res["accuracy"] for name, res in results.items()})

    def log_model(self, path, tag):
        """model.pt as an artifact `<run name>_<tag>`, when save_artifacts is set."""
        if not self.save_artifacts or not os.path.isfile(path):
            return
        import wandb
        artifact = wandb.Artifact(f"{self.name}_{tag}", type="model")
        artifact.add_file(path)
        self.run.log_artifact(artifact)

    def finish(self):
        if self.run is not None:
            self.run.finish()
            self.run = None


def _plain(value):
    """Config values as wandb stores them: containers of plain types."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
