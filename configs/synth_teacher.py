import os
import runpy

# The demo's teacher: a half-width iResNet-34 (11x the student's parameters) on the same data, a few more epochs.
#   torchrun --standalone --nproc_per_node=2 tools/train.py configs/synth_teacher.py

config = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "synth_mbf.py"))["config"]
config.network = "r34"
config.network_kwargs = {"width": 0.5}
config.num_epoch = 4
config.sampler = "random"
