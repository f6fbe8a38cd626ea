import os
import runpy

# The demo's student distilled with UKD as the KD studies recommend it: ILED (instance-level, dynamic hard mining) with
# the teacher's class centres in the margin softmax (AdaDistill's adaptive centres). studies/ukd_centres.py chose this
# form on validation over ILED + relational RPSD; RPSD added nothing on top of the centres (docs/benchmarks.md).
#   torchrun --standalone --nproc_per_node=2 tools/train.py configs/synth_mbf_ukd.py

config = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "synth_mbf_fc.py"))["config"]
# ILED at the FC student's weight (30, chosen on these data for FC); the centres term has no weight of its own
config.kd.losses = {
    "iled": {"weight": 30.0, "ratio": 0.25, "beta": 1.0},
    "adadistill": {"weight": 1.0, "hard_weighting": False},
}
