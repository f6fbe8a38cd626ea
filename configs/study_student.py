from easydict import EasyDict as edict

# The student of the KD studies (studies/default.py): a half-width MobileFaceNet on 32x32 procedural faces, trained
# for a short, fixed budget so that one run (training + scoring) takes about a minute of the 2-core machine.
# The study sets the data (rec, num_classes, num_image), the seed, the output folder and the kd section per run.
#   python tools/kd_study.py studies/default.py --jobs 2

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
config.num_epoch = 1
config.warmup_epoch = 0
config.val_targets = []

# P x K batches for every student, KD or not (the same sampler for every method; RPSD needs positives)
config.sampler = "pk"
config.pk_k = 4
config.pk_random_fraction = 0.5

# the teacher the KD students read (the study fills in its weights and cache)
config.kd = edict(enabled=False, teacher_network="r34", teacher_network_kwargs={"width": 0.5},
                  teacher_embedding_size=128, teacher_check=False)
