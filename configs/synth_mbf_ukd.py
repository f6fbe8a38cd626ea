import os
import runpy

# The demo's student distilled with UKD as the KD studies chose it on validation: ILED (instance-level, dynamic hard
# mining) + relational RPSD (student-student similarities matched to the teacher's over mined pairs, a FIFO student
# bank) with the teacher's class centres in the margin softmax (AdaDistill's adaptive centres); studies/ukd_centres.py
# and docs/benchmarks.md.
#   torchrun --standalone --nproc_per_node=2 tools/train.py configs/synth_mbf_ukd.py

config = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "synth_mbf_fc.py"))["config"]
# the study's chosen weights (ILED 30 is also the demo FC student's weight); the centres term has no weight of its own
config.kd.losses = {
    "iled": {"weight": 30.0, "ratio": 0.25, "beta": 1.0},
    "rpsd": {"weight": 100.0, "relation": "student", "bank": 4096, "k_neg": 128},
    "adadistill": {"weight": 1.0, "hard_weighting": False},
}
