from easydict import EasyDict as edict

# The student of the KD studies (studies/default.py): a quarter-width MobileFaceNet (0.14M parameters, 1/39 of the
# teacher's) on 32x32 procedural faces, trained for a short, fixed budget (3 epochs, 48k samples) so that one run,
# training and scoring, takes about a minute of the 2-core machine (two runs side by side, one core each).
# The study sets the data (rec, num_classes, num_image), the seed, the output folder and the kd section per run.
#   python tools/kd_study.py studies/default.py --jobs 2

config = edict()
config.margin_list = (1.0, 0.0, 0.1)   # CosFace with a small margin and scale: in 3 epochs s=64, m=0.4 leaves a
config.margin_scale = 16.0             # plain student at 0.8% val TAR@1e-4, s=16, m=0.1 at 9.5% (docs/benchmarks.md)
config.network = "mbf"
config.network_kwargs = {"width": 0.25}
config.input_size = 32
config.embedding_size = 128
config.output = None
config.sample_rate = 1.0
config.fp16 = False
config.channels_last = True            # 1.3x faster convolutions on CPU
config.batch_size = 64                 # one process per run: the study runs runs side by side instead
config.lr = 0.1
config.weight_decay = 5e-4
config.verbose = 10 ** 9               # no verification during training: the study scores every run itself
config.frequent = 50
config.num_workers = 0                 # decoding in the training process: no extra process per run
config.tensorboard = False

config.rec = "data/study"
config.num_classes = 1000
config.num_image = 16000
config.num_epoch = 3
config.warmup_epoch = 0
config.val_targets = []

# P x K batches for every student, KD or not (the same sampler for every method; RPSD needs positives)
config.sampler = "pk"
config.pk_k = 4
config.pk_random_fraction = 0.5

# the teacher the KD students read (the study fills in its weights and cache)
config.kd = edict(enabled=False, teacher_network="r34", teacher_network_kwargs={"width": 0.5},
                  teacher_embedding_size=128, teacher_check=False)
