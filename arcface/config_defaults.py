"""The engine's defaults, merged under every job config before the job's own values (upstream keeps these in
configs/base.py; here they ship with the package, so a config loads from any folder after `pip install .`).

A job file sets only what differs. Every key is explained in docs/configs.md (generated from config_keys.py).
Plugins bring their own sections and defaults (the KD plugin's `kd`); none of them is named here.
"""
from easydict import EasyDict as edict


def engine_defaults():
    """A fresh EasyDict of every engine key at its default value."""
    c = edict()

    # -- keys arcface_torch configs use, at the values its base config gives them --------------------------
    c.margin_list = (1.0, 0.5, 0.0)      # ArcFace; (1.0, 0.0, 0.4) is CosFace
    c.network = "r50"
    c.resume = False
    c.save_all_states = False
    c.output = None                      # None: work_dirs/<job file name>
    c.embedding_size = 512
    c.sample_rate = 1                    # Partial FC: every class centre each step
    c.interclass_filtering_threshold = 0
    c.fp16 = False
    c.batch_size = 128                   # per process
    c.optimizer = "sgd"
    c.lr = 0.1
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.verbose = 2000                     # steps between .bin verifications
    c.frequent = 10                      # steps between log lines
    c.dali = False
    c.dali_aug = False
    c.gradient_acc = 1
    c.seed = 2048
    c.num_workers = 2
    c.rec = None                         # the job file names its data...
    c.num_classes = None
    c.num_image = None
    c.num_epoch = 20
    c.warmup_epoch = 0
    c.val_targets = []
    c.wandb_key = None                   # Weights & Biases: off unless using_wandb
    c.suffix_run_name = None
    c.using_wandb = False
    c.wandb_entity = "entity"
    c.wandb_project = "project"
    c.wandb_log_all = True
    c.save_artifacts = False
    c.wandb_resume = False
    c.notes = ""

    # -- keys this engine adds; the defaults behave as upstream's hard-coded choices ------------------------
    c.margin_scale = 64.0
    c.margin_gradient = "straight_through"
    c.clip_grad_norm = 5.0
    c.input_size = 112
    c.network_kwargs = {}
    c.pretrained_backbone = None
    c.max_steps = None
    c.save_every_steps = 0
    c.channels_last = False
    c.flip = True
    c.sampler = "random"
    c.pk_k = 4
    c.pk_random_fraction = 0.0
    c.skip_bad_records = False
    c.val_batch_size = 64
    c.device = "auto"
    c.dist_backend = None
    c.dist_timeout = 1800
    c.resume_unsafe_pickle = False
    c.tensorboard = True
    c.num_threads = None
    c.plugins = []
    c.plugin_modules = []
    return c
