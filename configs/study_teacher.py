import os
import runpy

# The teacher of the KD studies: a half-width iResNet-34 (5.46M parameters, 39x the student's) on the same data, trained
# once per study (the study runs it with torchrun on 2 processes) for many more steps than a student gets.

config = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "study_student.py"))["config"]
config.margin_list = (1.0, 0.0, 0.4)   # the teacher has the steps for the usual CosFace margin
config.margin_scale = 64.0
config.network = "r34"
config.network_kwargs = {"width": 0.5}
config.fp16 = True                     # bf16 autocast on CPU: 1.6x faster for this network (fp32 embeddings)
config.batch_size = 32                 # per process, 64 with two
config.num_workers = 1
config.num_epoch = 8
config.sampler = "random"
