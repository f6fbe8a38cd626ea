import os
import runpy

# A quarter-width ViT-T (dim 64, 12 blocks, 8 heads, 3 px patches: a 10 x 10 token grid) on the demo's 32x32
# procedural faces (data/synth, made by tools/make_synthetic.py), trained from scratch as upstream trains its
# ViTs: AdamW, linear warmup, token masking and drop path.
#   torchrun --standalone --nproc_per_node=2 tools/train.py configs/synth_vit_t.py
# Measured (docs/benchmarks.md#vit-backbones): 1.02M parameters, 34 min on the 2 shared cores at load 6-11
# (~14 min quiet: 114 img/s),
# synth_val 97.40 +- 0.94, IJB-C-style TAR@FAR=1e-3 96.67 (README's demo table: r34-0.5 teacher 96.90 / 92.00,
# mbf-0.5 93.53 / 57.33).

config = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "synth_mbf.py"))["config"]
config.network = "vit_t"
config.network_kwargs = {"width": 0.25}
config.channels_last = False
config.optimizer = "adamw"
config.lr = 0.002
config.weight_decay = 0.05
config.num_epoch = 8
config.warmup_epoch = 1
config.sampler = "random"
