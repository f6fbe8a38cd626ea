"""The KD study runner: study files and their errors, selection on validation only, the t intervals, the subject
bootstrap against explicitly replicated pair lists, the generator's split options, and (slow) a whole tiny study:
resumed, continued after a kill, a failed run recorded, a foreign teacher cache refused."""
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from arcface.errors import ConfigError, DataError
from arcface.eval.metrics import tar_at_far

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- t intervals
def _t_cdf(x, df, steps=200_000):
    """P(T <= x) for x > 0 by the trapezoid rule on the t density (independent of the table)."""
    grid = np.linspace(0.0, x, steps)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    dens = np.exp(log_c - (df + 1) / 2 * np.log1p(grid ** 2 / df))
    return 0.5 + float(np.sum((dens[1:] + dens[:-1]) / 2 * np.diff(grid)))


@pytest.mark.parametrize("df", [2, 3, 4, 9, 29, 40, 100])
def test_t_quantiles_match_the_density(df):
    from plugins.ukd.study.stats import t_quantile_975
    assert _t_cdf(t_quantile_975(df), df) == pytest.approx(0.975, abs=2e-5)


def test_mean_ci95_is_the_t_interval():
    from plugins.ukd.study.stats import mean_ci95
    values = [0.50, 0.54, 0.49]
    out = mean_ci95(values)
    mean, sd = np.mean(values), np.std(values, ddof=1)
    assert out["mean"] == pytest.approx(mean)
    assert out["ci95"][1] - mean == pytest.approx(4.3027 * sd / math.sqrt(3), rel=1e-4)
    with pytest.raises(ConfigError, match="at least 2"):
        mean_ci95([0.5])


# ---------------------------------------------------------------------------------------------- bootstrap
def _pair_list(n_sub=120, templates=3, impostors=30000, seed=0):
    rng = np.random.default_rng(seed)
    subject_of = np.repeat(np.arange(n_sub) + 100, templates)  # subject ids need not start at 0
    genuine = [(a, b) for s in range(n_sub) for a in range(s * templates, (s + 1) * templates)
               for b in range(a + 1, (s + 1) * templates)]
    found = set()
    while len(found) < impostors:
        a, b = (int(x) for x in rng.integers(0, n_sub * templates, 2))
        if subject_of[a] != subject_of[b]:
            found.add((min(a, b), max(a, b)))
    pairs = np.array(genuine + sorted(found))
    labels = np.r_[np.ones(len(genuine)), np.zeros(len(found))].astype(np.int64)
    quality = rng.normal(0, 1, n_sub)
    noise = rng.normal(size=labels.size)
    scores = np.where(labels == 1, 0.45 + 0.15 * quality[subject_of[pairs[:, 0]] - 100] + 0.1 * noise, 0.1 * noise)
    return subject_of[pairs[:, 0]], subject_of[pairs[:, 1]], labels, np.round(scores, 3)  # rounding: ties


def test_weighted_tar_equals_the_replicated_pair_list():
    from plugins.ukd.study.bootstrap import weighted_tar_at_far
    s1, s2, labels, scores = _pair_list(impostors=5000)
    fars = (1e-3, 1e-2, 1e-1)
    ones = weighted_tar_at_far(scores, labels, np.ones(labels.size), fars)
    assert list(ones) == [tar_at_far(labels, scores, fars)[f] for f in fars]
    weights = np.random.default_rng(1).integers(0, 4, labels.size)
    weighted = weighted_tar_at_far(scores, labels, weights, fars)
    replicated = tar_at_far(np.repeat(labels, weights), np.repeat(scores, weights), fars)
    assert list(weighted) == [replicated[f] for f in fars]


def test_subject_bootstrap_replicates_are_resampled_subjects():
    from plugins.ukd.study.bootstrap import SubjectBootstrap
    s1, s2, labels, scores = _pair_list()
    fars = (1e-3, 1e-4)
    boot = SubjectBootstrap(s1, s2, labels, fars, replicates=40, seed=3)
    reps = boot.tars(scores)
    assert list(boot.point(scores)) == [tar_at_far(labels, scores, fars)[f] for f in fars]
    counts = {}
    for b in (0, 7, 39):
        # replicate b written out: subject k drawn w_k times -> its genuine pairs w_k times, impostors w_i * w_j
        multiplicity = dict(zip(np.unique(np.r_[s1, s2]), boot.weights[b]))
        w = np.array([multiplicity[a] if lab else multiplicity[a] * multiplicity[c]
                      for a, c, lab in zip(s1, s2, labels)]).astype(int)
        ref = tar_at_far(np.repeat(labels, w), np.repeat(scores, w), fars)
        assert list(reps[b]) == [ref[f] for f in fars]
        assert boot.total_neg[b] == pytest.approx(w[labels == 0].sum())
        counts[b] = int(boot.weights[b].sum())
    assert set(counts.values()) == {np.unique(s1).size}  # n subjects drawn per replicate
    assert reps.std(axis=0).min() > 0


def test_seed_pooling_resamples_seeds_jointly():
    from plugins.ukd.study.bootstrap import seed_pooled
    per_seed = np.arange(3 * 4 * 2, dtype=float).reshape(3, 4, 2)
    assert np.allclose(seed_pooled(per_seed), per_seed.mean(axis=0))
    draws = np.array([[0, 0, 0], [2, 2, 1], [1, 1, 1], [0, 1, 2]])
    pooled = seed_pooled(per_seed, draws)
    for b in range(4):
        assert np.allclose(pooled[b], per_seed[draws[b], b].mean(axis=0))


def test_bootstrap_refuses_inconsistent_pairs():
    from plugins.ukd.study.bootstrap import SubjectBootstrap
    with pytest.raises(DataError, match="genuine pair must join"):
        SubjectBootstrap([1, 1], [1, 2], [0, 0], (0.1,))


# ------------------------------------------------------------------------------------------------ selection
class _Result(dict):
    pass


def _results(study, val, test):
    """{(method, point, seed): result} with val / test primary values from per-(method, point) lists."""
    from plugins.ukd.study.spec import point_label
    out = {}
    for method in study.methods:
        for point in method.points():
            label = point_label(point)
            for k, seed in enumerate(study.seeds):
                out[(method.name, label, seed)] = {"status": "done", "metrics": {
                    "val": {"TAR@1e-4": val[(method.name, label)][k]},
                    "test": {"TAR@1e-4": test[(method.name, label)][k]}}}
    return out


def test_grid_point_and_best_baseline_are_chosen_on_validation(tmp_path):
    from plugins.ukd.study.selection import best_baseline, choose_points, point_table
    study = _load(tmp_path, _study_text())
    val = {("no KD", "default"): [0.30, 0.32], ("FC", "fc.weight=10"): [0.40, 0.42],
           ("FC", "fc.weight=30"): [0.45, 0.43], ("UKD", "iled.weight=10,rpsd.weight=10"): [0.41, 0.41],
           ("UKD", "iled.weight=30,rpsd.weight=30"): [0.39, 0.40]}
    # on test the other point of every method would win: selection must not look
    test = {("no KD", "default"): [0.50, 0.50], ("FC", "fc.weight=10"): [0.60, 0.61],
            ("FC", "fc.weight=30"): [0.30, 0.31], ("UKD", "iled.weight=10,rpsd.weight=10"): [0.20, 0.20],
            ("UKD", "iled.weight=30,rpsd.weight=30"): [0.70, 0.70]}
    results = _results(study, val, test)
    table = point_table(study, results)
    chosen = choose_points(study, table)
    assert table["FC"][chosen["FC"]]["label"] == "fc.weight=30"
    assert table["UKD"][chosen["UKD"]]["label"] == "iled.weight=10,rpsd.weight=10"
    assert best_baseline(study, table, chosen) == "FC"
    # a point with a failed seed does not take part, however good its other seed
    results[("FC", "fc.weight=10", 1)] = {"status": "failed"}
    val[("FC", "fc.weight=10")] = [0.99, 0.0]
    table = point_table(study, results)
    assert table["FC"][choose_points(study, table)["FC"]]["label"] == "fc.weight=30"


# ------------------------------------------------------------------------------------------------ study files
def _study_text(**replace):
    fields = dict(
        seeds="[0, 1]",
        data='dict(folder=DATA, val=dict(ijb="IJBV", bin="val.bin"), test=dict(ijb="IJBC", bin="test.bin"))',
        methods='''[
        dict(name="no KD", baseline=True),
        dict(name="FC", baseline=True, losses={"fc": {"weight": 1.0}}, grid={"fc.weight": [10, 30]}),
        dict(name="UKD", losses={"iled": {"weight": 1.0}, "rpsd": {"weight": 1.0, "bank": 256, "k_neg": 16}},
             grid={("iled.weight", "rpsd.weight"): [10, 30]}),
    ]''')
    fields.update(replace)
    return "\n".join([
        "import os",
        'DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")',
        "study = dict(",
        f"    student={str(ROOT / 'configs' / 'study_student.py')!r},",
        f"    seeds={fields['seeds']},",
        f"    data={fields['data']},",
        '    teacher=dict(weights=__file__, network="r18", embedding_size=16),',
        f"    methods={fields['methods']},",
        ")",
        "quick = dict(seeds=[3, 4])",
        ""])


def _load(tmp_path, text, quick=False):
    from plugins.ukd.study.spec import load_study
    path = tmp_path / "study.py"
    path.write_text(text)
    return load_study(str(path), quick=quick)


def test_study_file_expands_grids_and_quick(tmp_path):
    study = _load(tmp_path, _study_text())
    fc, ukd = study.method("FC"), study.method("UKD")
    assert fc.points() == [{"fc.weight": 10}, {"fc.weight": 30}]
    assert ukd.points() == [{"iled.weight": 10, "rpsd.weight": 10}, {"iled.weight": 30, "rpsd.weight": 30}]
    losses, kd = ukd.apply({"iled.weight": 30, "rpsd.weight": 30})
    assert losses == {"iled": {"weight": 30}, "rpsd": {"weight": 30, "bank": 256, "k_neg": 16}} and kd == {}
    assert ukd.losses["iled"]["weight"] == 1.0  # the method itself is not modified
    assert study.method("no KD").points() == [{}]
    assert [m.name for m in study.baselines] == ["no KD", "FC"]
    assert _load(tmp_path, _study_text(), quick=True).seeds == (3, 4)


@pytest.mark.parametrize("replace, message", [
    (dict(seeds="[0]"), "intervals over seeds need at least 2"),
    (dict(seeds="[1, 1]"), "lists a seed twice"),
    (dict(methods='[dict(name="FC", baseline=True, losses={"fc": {"weight": 1.0}}, grid={"fc.weight": []})]'),
     "is an empty grid"),
    (dict(methods='[dict(name="FC", baseline=True, losses={"fc": {"weight": 1.0}}, grid={"fcc.weight": [1]})]'),
     "has no KD term 'fcc'; did you mean 'fc'"),
    (dict(methods='[dict(name="FC", losses={"fc": {"weight": 1.0}})]'), "no method is marked baseline"),
    (dict(methods='[dict(name="FC", baseline=True, lossses={"fc": {"weight": 1.0}})]'),
     "unknown key 'lossses'; did you mean 'losses'"),
    (dict(data='dict(folder=DATA, val=dict(ijb="IJBC"), test=dict(ijb="IJBC"))'), "same IJB folder"),
    (dict(data='dict(folder=DATA, val=dict(ijb="A", bin="x.bin"), test=dict(ijb="B", bin="x.bin"))'), "same .bin"),
])
def test_bad_study_files_are_refused(tmp_path, replace, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, _study_text(**replace))


@pytest.mark.parametrize("losses, message", [
    ('{"fcc": {"weight": 1.0}}', "unknown KD loss 'fcc'; did you mean 'fc'"),
    ('{"iled": {"weight": 1.0, "ratioo": 0.5}}', "takes no parameter 'ratioo'; did you mean 'ratio'"),
    ('{"fc": {"weight": 1.0, "temperature": 4}}', "does not take the parameter"),
])
def test_unknown_losses_and_parameters_fail_the_check_before_training(tmp_path, losses, message):
    from plugins.ukd.study.runner import StudyRunner
    methods = f'[dict(name="X", baseline=True, losses={losses}, grid={{}})]'
    study = _load(tmp_path, _study_text(methods=methods))
    runner = StudyRunner(study, str(tmp_path / "out"), log=lambda line: None)
    with pytest.raises(ConfigError, match=message) as err:
        runner.check()
    assert "method 'X'" in str(err.value) and "seed 0" in str(err.value)
    assert not (tmp_path / "out" / "runs").exists()


# ------------------------------------------------------------------------------------------- generator options
SMALL = dict(seed=7, num_ids=6, per_id=3, size=32, val_ids=6, pairs=40, hard_pairs=20, ijb_ids=4,
             ijb_templates=3, ijb_media=2, ijb_frames=2, ijb_impostor_ratio=5)
# sha256 of every file (and its name) of generate(**SMALL) before the split options existed, with this Pillow
GOLDEN_SMALL = ("13.0.0", "6.2", "e7d04e7e57683a0edb2e347ee80dc480bcc35e4577e1fb17fc936c31e765bb55")


def _folder_hash(out):
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(out)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, out).encode())
            digest.update(open(path, "rb").read())
    return digest.hexdigest()


def test_default_generator_output_is_byte_identical(tmp_path):
    import PIL
    import PIL.features
    from arcface.data.synthetic import generate
    out = str(tmp_path / "g")
    manifest = generate(out, workers=1, progress=False, **SMALL)
    assert not {"val_ijb_name", "ijb_bin_pairs", "ijb_bin_name"} & set(manifest["spec"])
    if (PIL.__version__, PIL.features.version("jpg")) != GOLDEN_SMALL[:2]:
        pytest.skip(f"golden bytes recorded with Pillow {GOLDEN_SMALL[0]} / libjpeg {GOLDEN_SMALL[1]}")
    assert _folder_hash(out) == GOLDEN_SMALL[2]


@pytest.fixture(scope="module")
def split_data(tmp_path_factory):
    from arcface.data.synthetic import generate
    out = str(tmp_path_factory.mktemp("splits") / "data")
    manifest = generate(out, workers=1, progress=False, val_ijb_name="IJBV", ijb_bin_pairs=40, ijb_bin_name="test.bin",
                        **dict(SMALL, val_name="val.bin", hard_pairs=0))
    return out, manifest


def test_split_options_write_a_val_ijb_and_a_test_bin(split_data):
    from arcface.data.synthetic import artifact_splits
    from arcface.eval import ijb_io
    from arcface.eval.verification import load_bin
    out, manifest = split_data
    assert artifact_splits(manifest["spec"]) == {"train.rec": "train", "val.bin": "val", "IJBV": "val",
                                                 "IJBC": "ijb", "test.bin": "ijb"}
    assert manifest["counts"]["val_ijb_pairs"] > 0 and manifest["counts"]["ijb_bin_pairs"] == 40
    for folder, n_subjects in (("IJBV", SMALL["val_ids"]), ("IJBC", SMALL["ijb_ids"])):
        tids, subjects = ijb_io.read_template_subjects(os.path.join(out, folder), "IJBC")  # same meta prefix
        pairs = ijb_io.read_template_pairs(os.path.join(out, folder), "IJBC")
        assert np.unique(subjects).size == n_subjects and tids.size == n_subjects * SMALL["ijb_templates"]
        lookup = dict(zip(tids, subjects))
        same = np.array([lookup[a] == lookup[b] for a, b in zip(pairs.t1, pairs.t2)])
        assert (same == (pairs.label == 1)).all()
    assert len(load_bin(os.path.join(out, "test.bin"), 32)) == 40
    # the two IJB folders render different people: their first crops differ
    a = open(os.path.join(out, "IJBV", "loose_crop", "1.jpg"), "rb").read()
    assert a != open(os.path.join(out, "IJBC", "loose_crop", "1.jpg"), "rb").read()


@pytest.mark.parametrize("kwargs, message", [
    (dict(val_ijb_name="IJBC"), "val_ijb_name and ijb_name are both"),
    (dict(val_ijb_name="a/b"), "plain folder name"),
    (dict(ijb_bin_pairs=30, ijb_bin_name="t.bin"), "multiple of 20"),
    (dict(ijb_bin_pairs=40, ijb_bin_name="synth_val.bin"), "already the name of another .bin"),
    (dict(val_ijb_name="V", val_ids=0, hard_pairs=0), "needs verification identities"),
])
def test_bad_split_options(tmp_path, kwargs, message):
    from arcface.data.synthetic import generate
    with pytest.raises(ConfigError, match=message):
        generate(str(tmp_path / "bad"), progress=False, **dict(SMALL, **kwargs))


def test_overlapping_val_and_test_identities_are_refused(tmp_path, split_data):
    from plugins.ukd.study.spec import SplitSpec
    from plugins.ukd.study.validation import check_disjoint_identities
    out, _ = split_data
    val = SplitSpec(ijb=os.path.join(out, "IJBV"), bin=os.path.join(out, "val.bin"))
    test = SplitSpec(ijb=os.path.join(out, "IJBC"), bin=os.path.join(out, "test.bin"))
    assert check_disjoint_identities(out, val, test).startswith("disjoint")
    crossed = SplitSpec(ijb=os.path.join(out, "IJBV"), bin=os.path.join(out, "test.bin"))  # .bin of the test people
    with pytest.raises(DataError, match="share identities"):
        check_disjoint_identities(out, crossed, test)


def test_template_subjects_refuse_a_template_with_two_subjects(tmp_path, split_data):
    import shutil
    from arcface.eval import ijb_io
    out, _ = split_data
    folder = tmp_path / "IJBC"
    shutil.copytree(os.path.join(out, "IJBC"), folder)
    probe = folder / "meta" / "ijbc_1N_probe_mixed.csv"
    lines = probe.read_text().splitlines()
    first = lines[1].split(",")
    lines.append(",".join([first[0], str(int(first[1]) + 1)] + first[2:]))
    probe.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"template {first[0]} is listed with more than one SUBJECT_ID"):
        ijb_io.read_template_subjects(str(folder), "IJBC")


# ------------------------------------------------------------------------------------------------- a whole study
TINY_TEACHER = """
import os, runpy
config = runpy.run_path({student!r})["config"]
config.network = "r18"
config.network_kwargs = {{"width": 0.25}}
config.embedding_size = 32
config.batch_size = 16
config.max_steps = 12
config.num_workers = 0
config.sampler = "random"
"""

TINY_STUDY = """
study = dict(
    student={student!r},
    seeds=[0, 1],
    primary="TAR@1e-2",
    fars=[1e-1, 1e-2],
    bootstrap=100,
    data=dict(folder={data!r},
              make_synthetic=dict(num_ids=16, per_id=4, size=16, seed={seed}, val_ids=8, pairs=40, ijb_ids=12,
                                  ijb_templates=3, ijb_media=1, ijb_frames=1, ijb_impostor_ratio=10,
                                  val_name="val.bin", val_ijb_name="IJBV", ijb_bin_pairs=40, ijb_bin_name="test.bin"),
              val=dict(ijb="IJBV", bin="val.bin"),
              test=dict(ijb="IJBC", bin="test.bin")),
    teacher={teacher},
    train=dict(batch_size=16, max_steps=4, frequent=1),
    methods=[
        dict(name="no KD", baseline=True),
        dict(name="FC", baseline=True, losses={{"fc": {{"weight": 1.0}}}}, grid={{"fc.weight": [1, 10]}}),
    ],
)
"""


def _tiny_study(tmp_path, name, data, teacher, seed=0):
    student = tmp_path / "student.py"
    if not student.exists():
        student.write_text(f"import runpy\nconfig = runpy.run_path({str(ROOT / 'configs' / 'study_student.py')!r})"
                           "['config']\nconfig.input_size = 16\n")
        (tmp_path / "teacher.py").write_text(TINY_TEACHER.format(student=str(student)))
    path = tmp_path / f"{name}.py"
    path.write_text(TINY_STUDY.format(student=str(student), data=str(data), teacher=teacher, seed=seed))
    return str(path)


def _mtimes(out):
    return {str(p): p.stat().st_mtime_ns for p in Path(out, "runs").rglob("result.json")}


@pytest.mark.slow
def test_a_tiny_study_end_to_end(tmp_path, monkeypatch, capsys):
    """A whole study in about a minute: the outputs, a restart that trains nothing, a killed run continued, a
    failed run recorded while the rest goes on, and a teacher cache of other data refused before any training."""
    from plugins.ukd.study import commands
    from plugins.ukd.tools.kd_study import main

    monkeypatch.chdir(tmp_path)
    study = _tiny_study(tmp_path, "tiny", tmp_path / "data", f"dict(config={str(tmp_path / 'teacher.py')!r})")
    out = str(tmp_path / "out")
    real_train = commands.train_command

    def failing_for_one_run(config, overrides, nproc=1):  # a run whose training crashes, however well checked
        if overrides.get("kd.losses") == {"fc": {"weight": 10}} and overrides["seed"] == 1:
            return [sys.executable, "-c", "import sys; print('RuntimeError: simulated crash'); sys.exit(3)"]
        return real_train(config, overrides, nproc)

    monkeypatch.setattr(commands, "train_command", failing_for_one_run)
    assert main([study, "--out", out, "--jobs", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("] no KD default seed") == 2 and "FC fc.weight=1 seed 0: val TAR@1e-2" in printed
    assert "FC fc.weight=10 seed 1: FAILED in train (exit 3)" in printed and "simulated crash" in printed

    summary = json.loads(Path(out, "summary.json").read_text())
    assert summary["primary"] == "TAR@1e-2" and summary["best_baseline"] in ("no KD", "FC")
    fc = summary["methods"]["FC"]
    assert fc["best_weights"] == {"fc.weight": 1}  # the point with a failed seed cannot be chosen
    for name in ("no KD", "FC"):
        entry = summary["methods"][name]
        for metric in ("TAR@1e-1", "TAR@1e-2", "accuracy"):
            stat = entry["test"][metric]
            assert 0 <= stat["ci95"][0] <= stat["mean"] <= stat["ci95"][1] <= 1  # clipped to the metric's range
        diff = entry["vs_best_baseline"]["TAR@1e-2"]
        assert diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1] or diff["ci95"] == [0.0, 0.0]
    assert summary["methods"][summary["best_baseline"]]["vs_best_baseline"]["TAR@1e-2"]["mean"] == 0
    # the paired difference to every baseline, not only the best: antisymmetric, the best one's is vs_best_baseline
    no_kd, fc_vs = summary["methods"]["no KD"]["vs_baselines"], fc["vs_baselines"]
    assert no_kd[summary["best_baseline"]] == summary["methods"]["no KD"]["vs_best_baseline"]
    assert fc_vs["no KD"]["TAR@1e-2"]["per_seed"] == [-v for v in no_kd["FC"]["TAR@1e-2"]["per_seed"]]
    lo, hi = fc_vs["no KD"]["TAR@1e-2"]["ci95"]
    assert no_kd["FC"]["TAR@1e-2"]["ci95"] == pytest.approx([-hi, -lo])
    assert fc_vs["FC"]["TAR@1e-2"]["mean"] == 0 == no_kd["no KD"]["TAR@1e-2"]["mean"]
    md = Path(out, "summary.md").read_text()
    other = "FC" if summary["best_baseline"] == "no KD" else "no KD"
    assert f"## Difference to the best baseline ({summary['best_baseline']})" in md
    assert f"## Difference to the baseline ({other})" in md
    assert [f["run"] for f in summary["runs"]["failed"]] == ["FC fc.weight=10 seed 1"]
    assert summary["teacher"]["test"]["TAR@1e-2"] is not None
    for name in ("summary.md", "primary_vs_weight.png", "roc_test.png"):
        assert Path(out, name).stat().st_size > 0
    assert re.search(r"\| FC \(baseline\) +\| fc\.weight=1 +\|", Path(out, "summary.md").read_text())

    # started again: every run is finished or failed, nothing trains
    before = _mtimes(out)
    assert main([study, "--out", out, "--no-progress"]) == 0
    assert "6 of 6 runs already finished" in capsys.readouterr().out and _mtimes(out) == before

    # a run killed mid-way (no result.json) is trained again, alone; a failed one only with --retry-failed
    killed = Path(out, "runs", "no-kd", "default", "seed1", "result.json")
    killed.unlink()
    monkeypatch.setattr(commands, "train_command", real_train)
    assert main([study, "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "5 of 6 runs already finished" in printed and "[6/6] no KD default seed 1: val" in printed
    assert main([study, "--out", out, "--no-progress", "--retry-failed"]) == 0
    assert "[6/6] FC fc.weight=10 seed 1: val" in capsys.readouterr().out
    assert json.loads(Path(out, "summary.json").read_text())["runs"]["failed"] == []

    # the same teacher's cache offered for another data set: refused before any student is trained
    other = _tiny_study(tmp_path, "other", tmp_path / "other_data",
                        f"dict(weights={str(Path(out, 'teacher', 'train', 'model.pt'))!r}, network='r18', "
                        f"network_kwargs={{'width': 0.25}}, embedding_size=32, "
                        f"cache={str(Path(out, 'teacher', 'teacher.tcache'))!r})", seed=5)
    assert main([other, "--out", str(tmp_path / "out_other"), "--no-progress"]) == 2
    assert "built for another data set" in capsys.readouterr().err
    assert not Path(tmp_path, "out_other", "runs").exists()
