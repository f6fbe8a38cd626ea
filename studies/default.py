# The default KD study: the plain student, the two classic instance-level baselines (L2, feature consistency), the
# state-of-the-art FR distillation methods (EKD, CoupleFace, AdaDistill, ProxylessKD) and UKD (ILED + relational
# RPSD; and FC + relational RPSD, to see what the relation term adds to the best instance loss), each over a grid of
# weights, 3 seeds, on the unsaturated procedural benchmark of docs/benchmarks.md ("KD study"). About two hours on
# 2 CPU cores with --jobs 2, data and teacher included.
#   python tools/kd_study.py studies/default.py --jobs 2
#   python tools/kd_study.py studies/default.py --quick --jobs 2      # 2 methods x 2 weights x 2 seeds, minutes
# New methods go into `methods` (any kd.losses dict with a grid), under the same budget, seeds and data.

# RPSD in its relational form (student-student similarities matched to teacher-teacher ones over mined pairs,
# student bank FIFO): the screening of docs/benchmarks.md ("UKD variants") put it ahead of the cross form
RPSD = {"weight": 1.0, "relation": "student", "bank": 4096, "k_neg": 128}
UKD_LOSSES = {"iled": {"weight": 1.0, "ratio": 0.25, "beta": 1.0}, "rpsd": RPSD}
FC_RPSD_LOSSES = {"fc": {"weight": 1.0}, "rpsd": RPSD}
# ProxylessKD's fixed centres from the study's own teacher cache (the study writes it there before any student runs;
# the path is relative to the repository root, where the study is started, and assumes the default --out)
STUDY_CACHE = "work_dirs/kd_study/default/teacher/teacher.tcache"

study = dict(
    name="default",
    student="configs/study_student.py",     # quarter-width MobileFaceNet, 3 epochs (48k samples), P x K batches
    seeds=[0, 1, 2],
    primary="TAR@1e-4",
    data=dict(
        folder="data/study",
        # 1000 training identities x 16 images at 32x32 (nuisance 0.7); validation: 1000 other people (IJB-style
        # folder IJBV + 1000 .bin pairs); test: 4000 other people (IJB-style IJBC, 6M impostor pairs, + test.bin)
        make_synthetic=dict(seed=0, num_ids=1000, per_id=16, size=32, difficulty=0.7, val_ids=1000, pairs=1000,
                            val_name="val.bin", val_ijb_name="IJBV", ijb_ids=4000, ijb_name="IJBC",
                            ijb_templates=3, ijb_media=2, ijb_frames=1, ijb_impostor_ratio=500, ijb_difficulty=0.7,
                            ijb_bin_pairs=1000, ijb_bin_name="test.bin"),
        val=dict(ijb="IJBV", target="IJBC", bin="val.bin"),
        test=dict(ijb="IJBC", target="IJBC", bin="test.bin"),
    ),
    teacher=dict(config="configs/study_teacher.py"),   # half-width iResNet-34, 8 epochs, trained once
    methods=[
        dict(name="no KD", baseline=True),
        dict(name="FC", baseline=True, losses={"fc": {"weight": 1.0}}, grid={"fc.weight": [30, 100, 300]}),
        dict(name="L2", baseline=True, losses={"l2": {"weight": 1.0}}, grid={"l2.weight": [10, 30, 100]}),
        dict(name="UKD", losses=UKD_LOSSES, grid={"iled.weight": [30, 100], "rpsd.weight": [100, 300]}),
        dict(name="FC + RPSD", losses=FC_RPSD_LOSSES, grid={"fc.weight": [100], "rpsd.weight": [100, 300]}),
        # EKD's grid went below TFace's weight 1 after the first pass: 1 was the best of [1, 10, 100] on validation
        dict(name="EKD", losses={"ekd": {"weight": 1.0}}, grid={"ekd.weight": [0.1, 0.3, 1, 10, 100]}),
        dict(name="CoupleFace", losses={"fc": {"weight": 100.0}, "mrd": {"weight": 1.0}},
             grid={"mrd.weight": [3, 30]}),
        dict(name="AdaDistill", losses={"adadistill": {"weight": 1.0}}, grid={"adadistill.hard_weighting": [True, False]}),
        # the second pass: ILED's other hardness rules at UKD's best validation point, and the relation term on top
        # of the best state-of-the-art method of the first pass (AdaDistill)
        dict(name="UKD, margin hardness", losses={"iled": dict(UKD_LOSSES["iled"], hardness="margin"), "rpsd": RPSD},
             grid={"iled.weight": [100], "rpsd.weight": [300]}),
        dict(name="UKD, EMA hardness", losses={"iled": dict(UKD_LOSSES["iled"], mode="ema"), "rpsd": RPSD},
             grid={"iled.weight": [100], "rpsd.weight": [300]}),
        dict(name="AdaDistill + RPSD", losses={"adadistill": {"weight": 1.0, "hard_weighting": False}, "rpsd": RPSD},
             grid={"rpsd.weight": [100, 300]}),
        dict(name="ProxylessKD", losses={"proxyless": {"weight": 1.0, "teacher_cache": STUDY_CACHE}},
             grid={"proxyless.weight": [1]}),
    ],
)

# --quick: a tiny version of everything (300 training identities, a 4-epoch teacher, 1-epoch students), FC and UKD at
# two weights each (ILED = RPSD tied for UKD), 2 seeds: a check that the whole study runs (minutes), not a result
quick = dict(
    seeds=[0, 1],
    bootstrap=200,
    data=dict(
        folder="data/study_quick",
        make_synthetic=dict(seed=1, num_ids=300, per_id=8, size=32, difficulty=0.7, val_ids=200, pairs=200,
                            val_name="val.bin", val_ijb_name="IJBV", ijb_ids=400, ijb_name="IJBC",
                            ijb_templates=3, ijb_media=1, ijb_frames=1, ijb_impostor_ratio=100, ijb_difficulty=0.7,
                            ijb_bin_pairs=200, ijb_bin_name="test.bin"),
        val=dict(ijb="IJBV", target="IJBC", bin="val.bin"),
        test=dict(ijb="IJBC", target="IJBC", bin="test.bin"),
    ),
    teacher=dict(config="configs/study_teacher.py", set={"num_epoch": 4}),
    train=dict(num_epoch=2),
    methods=[
        dict(name="FC", baseline=True, losses={"fc": {"weight": 1.0}}, grid={"fc.weight": [30, 100]}),
        dict(name="UKD", losses=UKD_LOSSES, grid={("iled.weight", "rpsd.weight"): [30, 100]}),
    ],
)
