"""A study from start to end: check everything, then data -> teacher -> cache -> splits -> runs -> summary.

Every stage keeps its output under the study's folder and is skipped when already done, so a killed study started
again continues where it stopped. Nothing trains before every run's config has been checked.
"""
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from . import data as study_data
from . import teacher as study_teacher
from .runs import Launcher, Run, check_existing, execute_run, progress_line, run_folder
from .spec import point_label
from .validation import check_run_config

PLACEHOLDER_CACHE = "<teacher cache, built by the study>"


def student_overrides(study, method, point, seed, folder, rec, teacher_kd):
    """The config overrides of one run: its seed, data, output, KD section; the study's `train` keys last."""
    overrides = dict(rec)
    overrides.update({"seed": int(seed), "output": os.path.join(folder, "train"), "val_targets": [],
                      "tensorboard": False})
    if method.kd_enabled:
        losses, kd = method.apply(point)
        overrides["kd.enabled"] = True
        overrides["kd.losses"] = losses
        overrides.update(teacher_kd)
        overrides.update({f"kd.{k}": v for k, v in kd.items()})
    else:
        overrides["kd.enabled"] = False
    overrides.update(study.train)
    return overrides


def plan(study, out, rec, teacher_kd):
    """Every run of the study, seeds innermost-last so that an interrupted study has whole grid points first."""
    runs = []
    for seed in study.seeds:
        for method in study.methods:
            for point in method.points():
                folder = run_folder(out, method, point, seed)
                runs.append(Run(method, point, seed, folder,
                                student_overrides(study, method, point, seed, folder, rec, teacher_kd)))
    return runs


def validate_runs(study, runs):
    """Load every run's config (and build its KD losses) before anything is trained."""
    cfg = None
    for run in runs:
        cfg = check_run_config(study.student, run.overrides, f"{study.path}: method '{run.method.name}' at "
                                                             f"{point_label(run.point)}, seed {run.seed}")
    return cfg


class StudyRunner:
    def __init__(self, study, out, jobs=1, threads=None, retry_failed=False, progress=True, log=print):
        self.study, self.out = study, os.path.abspath(out)
        self.jobs = max(1, int(jobs))
        cores = os.cpu_count() or 1
        self.threads = max(1, int(threads) if threads else cores // self.jobs)
        self.nproc = max(1, min(cores, 2))
        self.retry_failed = retry_failed
        self.progress = progress
        self.log = log
        self.launcher = Launcher(os.getcwd())

    # ------------------------------------------------------------------ stages
    def check(self):
        """Every run's config loaded and its KD losses built, with the data and teacher still placeholders: a typo
        fails here, before hours of work. Returns the student's config (of the last run)."""
        study = self.study
        folder = study.data["folder"]
        teacher = study_teacher.teacher_description(study, {"rec": folder})
        probe = dict(teacher, weights=teacher["weights"] or self.teacher_weights_path())
        if probe["embedding_size"] is None:
            probe["embedding_size"] = 512
        runs = plan(study, self.out, {"rec": folder}, study_teacher.kd_teacher_overrides(probe, PLACEHOLDER_CACHE))
        student_cfg = validate_runs(study, runs)
        self.log(f"study {study.name}: {len(study.methods)} methods, {len(runs)} runs ({len(study.seeds)} seeds), "
                 f"every config checked; output in {self.out}")
        return student_cfg

    def teacher_weights_path(self):
        return os.path.join(self.out, "teacher", "train", "model.pt")

    def cache_path(self):
        return self.study.teacher.get("cache") or os.path.join(self.out, "teacher", "teacher.tcache")

    def prepare(self):
        """Checks, data, teacher, cache and splits; returns (runs, splits, teacher metrics)."""
        study = self.study
        student_cfg = self.check()
        os.makedirs(self.out, exist_ok=True)
        folder = study.data["folder"]
        if study_data.generate_data(study, self.launcher, self.out, self.threads * self.jobs):
            self.log(f"data: {folder} ready")
        identities = study_data.check_data(study)
        self.log(f"data: identities {identities}")
        classes, images = study_data.training_counts(folder)
        rec = {"rec": folder, "num_classes": classes, "num_image": images}
        teacher = study_teacher.teacher_description(study, rec)
        if teacher["input_size"] is None:
            teacher["input_size"] = int(student_cfg.input_size)
        study_data.check_input_size("the teacher", teacher["input_size"], student_cfg.input_size)
        if teacher["config"]:
            teacher["weights"], done = study_teacher.train_teacher(teacher, self.out, self.launcher, self.nproc)
            self.log(f"teacher: {teacher['weights']} ({done['train_seconds']:.0f} s to train)")
        if teacher["embedding_size"] is None:
            teacher["embedding_size"] = study_teacher.embedding_size_of(teacher)
        started = time.time()
        cache = study_teacher.build_cache(study, teacher, rec, self.out, self.launcher, self.nproc)
        self.log(f"teacher cache: {cache} ({time.time() - started:.0f} s)")
        started = time.time()
        splits = study_data.prepare_splits(study, self.out, int(student_cfg.input_size), self.threads * self.jobs)
        self.log(f"splits ready in {time.time() - started:.0f} s: " + "; ".join(
            f"{name} {_counts(path)}" for name, path in splits.items()))
        teacher_metrics = study_teacher.evaluate_teacher(teacher, splits, self.out, self.launcher,
                                                         self.threads * self.jobs, study.fars)
        self.log("teacher: " + _metric_line(teacher_metrics, study))
        runs = plan(study, self.out, rec, study_teacher.kd_teacher_overrides(teacher, cache))
        validate_runs(study, runs)
        check_existing(runs)
        self._student(student_cfg)
        return runs, splits, teacher_metrics

    def _student(self, cfg):
        self.student = {"config": self.study.student, "network": cfg.network,
                        "network_kwargs": dict(cfg.network_kwargs or {}), "input_size": int(cfg.input_size)}

    def summarise(self, runs=None, splits=None, teacher_metrics=None):
        """Write summary.json, summary.md and the plots from the runs that have finished."""
        import json

        from .summary import StudySummary, write

        if runs is None:
            study = self.study
            self.check()
            classes, images = study_data.training_counts(study.data["folder"])
            rec = {"rec": study.data["folder"], "num_classes": classes, "num_image": images}
            teacher = study_teacher.teacher_description(study, rec)
            teacher["weights"] = teacher["weights"] or self.teacher_weights_path()
            teacher["embedding_size"] = teacher["embedding_size"] or 512
            runs = plan(study, self.out, rec, study_teacher.kd_teacher_overrides(teacher, self.cache_path()))
            splits = {name: os.path.join(self.out, "splits", name) for name in ("val", "test")}
            metrics_file = os.path.join(self.out, "teacher", "eval", "metrics.json")
            if os.path.isfile(metrics_file):
                with open(metrics_file) as f:
                    teacher_metrics = json.load(f)
        teacher_folder = os.path.join(self.out, "teacher")
        has_teacher = os.path.isfile(os.path.join(teacher_folder, "eval", "test_templates.npy"))
        summary = write(StudySummary(self.study, runs, splits, teacher_metrics,
                                     teacher_folder if has_teacher else None), self.out)
        self.log(f"summary: {os.path.join(self.out, 'summary.md')}")
        return summary

    def execute(self, runs, splits):
        """Train and score every run not done yet, `jobs` at a time; one line per finished run."""
        from tqdm import tqdm

        todo = []
        for run in runs:
            result = run.result()
            if result is None or (result.get("status") != "done" and self.retry_failed):
                todo.append(run)
        skipped = len(runs) - len(todo)
        if skipped:
            self.log(f"{skipped} of {len(runs)} runs already finished (skipped)")
        metrics = self.study.metric_names()
        bar = tqdm(total=len(runs), initial=skipped, desc="runs", unit="run", disable=not self.progress,
                   file=sys.stderr, dynamic_ncols=True)
        lock = threading.Lock()
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        try:
            pending = {pool.submit(execute_run, run, self.launcher, self.threads, self.student, splits,
                                   self.study.fars): run
                       for run in todo}
            finished = skipped
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    run = pending.pop(future)
                    result = future.result()
                    finished += 1
                    with lock:
                        line = f"[{finished}/{len(runs)}] " + progress_line(run, result, self.study.primary, metrics)
                        tqdm.write(line) if self.progress else self.log(line)
                        bar.update(1)
        except BaseException:
            for future in list(pending):
                future.cancel()
            self.launcher.stop_all()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def run(self):
        started = time.time()
        runs, splits, teacher_metrics = self.prepare()
        self.execute(runs, splits)
        summary = self.summarise(runs, splits, teacher_metrics)
        self.log(f"study done in {time.time() - started:.0f} s")
        return summary


def _counts(folder):
    from .evaluation import EvalSplit

    c = EvalSplit(folder).counts
    return (f"{c['subjects']} subjects, {c['templates']} templates, {c['genuine']} genuine / {c['impostor']} impostor "
            f"pairs" + (f", {c['bin_pairs']} .bin pairs" if c.get("bin_pairs") else ""))


def _metric_line(metrics, study):
    parts = []
    for split in ("val", "test"):
        values = metrics.get(split, {})
        parts.append(f"{split} " + " ".join(f"{name} {values[name] * 100:.2f}" for name in study.metric_names()
                                            if values.get(name) is not None))
    return " | ".join(parts)


def run_study(study, out, **kwargs):
    return StudyRunner(study, out, **kwargs).run()
