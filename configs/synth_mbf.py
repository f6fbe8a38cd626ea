from easydict import EasyDict as edict

# The demo's student: a half-width MobileFaceNet on 32x32 procedural faces (data/synth, made by
# tools/make_synthetic.py), trained without distillation. Minutes on 2 CPU cores.
#   torchrun --standalone --nproc_per_node=2 tools/train.py configs/synth_mbf.py

config = edict()
config.margin_list = (1.0, 0.0, 0.4)   # CosFace: converges reliably on small data
config.network = "mbf"
config.network_kwargs = {"width": 0.5}
config.input_size = 32
config.embedding_size = 128
config.output = None
config.sample_rate = 1.0
config.fp16 = False
config.channels_last = True            # 1.3x faster convolutions on CPU
config.batch_size = 32                 # per process; 64 with two processes
config.lr = 0.1
config.weight_decay = 5e-4
config.verbose = 10 ** 9               # verification once, at the end of training
config.frequent = 50
config.num_workers = 1

config.rec = "data/synth"
config.num_classes = 500
config.num_image = 12000
config.num_epoch = 4
config.warmup_epoch = 0
config.val_targets = ["synth_val"]

# P x K batches for every student (fair comparison; RPSD needs positives)
config.sampler = "pk"
config.pk_k = 4
config.pk_random_fraction = 0.5
