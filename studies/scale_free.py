# The scale-free weights study (a term's `scale`, docs/plugins.md): with scale='grad' every KD term is divided by a
# running estimate of the per-sample size of its gradient at the student embedding, so that its weight is a force
# and, the claim goes, one weight means the same for every loss. Does it hold? FC, L2 and UKD (ILED + relational
# RPSD, the two terms tied to one weight) each run over the same grid of scale-free weights; FC and L2 unscaled, at
# the weights the earlier studies chose on validation (FC 100, L2 300), are the baselines. It holds if the three
# choose the same weight on validation and each is no worse there than its unscaled, separately tuned self.
# Same benchmark, student config, seeds and data as studies/default.py; its own teacher from the same config.
# 42 runs; on a 2-core machine data 12 min, teacher 13 min, then about 65 s a run with --jobs 2.
#   python tools/kd_study.py studies/scale_free.py --jobs 2

import os
import runpy

_DEFAULT_FILE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))
DEFAULT, RPSD, ILED = _DEFAULT_FILE["study"], _DEFAULT_FILE["RPSD"], _DEFAULT_FILE["UKD_LOSSES"]["iled"]
GRAD = {"scale": "grad"}
# one grid of forces for every loss, bracketing unscaled FC 100's: FC's running gradient scale is about 0.05 per
# sample late in training (kd/fc/scale in the first run's log), so FC 100 unscaled pulls with a force of about 5
# (60 added in a second pass: 20, the first grid's top, led FC's and L2's seed-0 validation)
FORCES = [2, 7, 20, 60]

study = dict(
    name="scale_free",
    student=DEFAULT["student"],
    seeds=[0, 1, 2],
    primary="TAR@1e-4",
    data=DEFAULT["data"],
    teacher=DEFAULT["teacher"],
    methods=[  # in the order they train
        dict(name="FC, scale-free", losses={"fc": dict(GRAD, weight=1.0)}, grid={"fc.weight": FORCES}),
        dict(name="FC", baseline=True, losses={"fc": {"weight": 1.0}}, grid={"fc.weight": [100]}),
        dict(name="L2", baseline=True, losses={"l2": {"weight": 1.0}}, grid={"l2.weight": [300]}),
        dict(name="L2, scale-free", losses={"l2": dict(GRAD, weight=1.0)}, grid={"l2.weight": FORCES}),
        dict(name="UKD, scale-free", losses={"iled": dict(ILED, **GRAD), "rpsd": dict(RPSD, **GRAD)},
             grid={("iled.weight", "rpsd.weight"): FORCES}),
    ],
)
