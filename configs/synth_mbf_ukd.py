import os
import runpy

# The demo's student distilled with UKD: ILED (dynamic hard mining) + RPSD (memory bank + sample mining).
#   torchrun --standalone --nproc_per_node=2 tools/train.py configs/synth_mbf_ukd.py

config = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "synth_mbf_fc.py"))["config"]
config.kd.losses = {
    "iled": {"weight": 10.0, "ratio": 0.25, "beta": 1.0},
    "rpsd": {"weight": 10.0, "bank": 4096, "k_neg": 128},
}
