import os
import runpy

# The demo's teacher: a half-width iResNet-34 (11x the student's parameters) on the same data, more epochs.
#   torchrun --standalone --nproc_per_node=2 tools/train.py configs/synth_teacher.py

config = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "synth_mbf.py"))["config"]
config.network = "r34"
config.network_kwargs = {"width": 0.5}
config.num_epoch = 6
config.fp16 = True                     # bf16 autocast on CPU: 1.6x faster for this network (fp32 embeddings)
config.sampler = "random"
