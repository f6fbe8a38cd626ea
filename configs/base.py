from easydict import EasyDict as edict

# Defaults for every job config. Upstream arcface_torch keys first, with upstream's values; then the keys
# this engine adds (see docs/configs.md). A job file only sets what differs.

config = edict()

# Margin Base Softmax
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.resume = False
config.save_all_states = False
config.output = None

config.embedding_size = 512

# Partial FC
config.sample_rate = 1
config.interclass_filtering_threshold = 0

config.fp16 = False
config.batch_size = 128

# For SGD
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4

config.verbose = 2000
config.frequent = 10

# For Large Scale Dataset, such as WebFace42M
config.dali = False
config.dali_aug = False

# Gradient ACC
config.gradient_acc = 1

# setup seed
config.seed = 2048

# dataload numworkers
config.num_workers = 2

# data (job files set these)
config.rec = None
config.num_classes = None
config.num_image = None
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = []

# WandB Logger (optional)
config.wandb_key = None
config.suffix_run_name = None
config.using_wandb = False
config.wandb_entity = "entity"
config.wandb_project = "project"
config.wandb_log_all = True
config.save_artifacts = False
config.wandb_resume = False
config.notes = ""

# ---- engine additions (upstream behaviour by default) ----
config.margin_scale = 64.0
config.clip_grad_norm = 5.0
config.input_size = 112
config.network_kwargs = {}
config.pretrained_backbone = None
config.max_steps = None
config.save_every_steps = 0
config.channels_last = False
config.flip = True
config.sampler = "random"
config.pk_k = 4
config.pk_random_fraction = 0.0
config.skip_bad_records = False
config.val_batch_size = 64
config.device = "auto"
config.dist_backend = None
config.tensorboard = True
config.plugins = []

# Knowledge distillation: off by default; see configs/ms1mv3_mbf_ukd.py and docs/configs.md#kd
config.kd = edict(enabled=False)
