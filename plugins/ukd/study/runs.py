"""The study's runs: one folder per (method, grid point, seed), each trained and scored by subprocesses.

A run folder holds run.json (what the run is: method, point, seed, the exact config overrides and commands),
train.log / eval.log, the student under train/, its scores under eval/, and result.json, written last and
atomically: 'done' with the metrics, or 'failed' with the log to read. A run whose result.json says done is
skipped on the next start; one without it (killed) is started again from an empty folder; a failed one is kept
as failed unless retried. A folder whose run.json records other overrides than the study now asks for is an error
before anything runs: its numbers would otherwise be mixed with the new settings'.
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from arcface.errors import ConfigError
from arcface.eval import report

from . import commands
from .spec import point_label, slug


@dataclass
class Run:
    method: object          # spec.Method
    point: dict
    seed: int
    folder: str
    overrides: dict = field(default_factory=dict)

    @property
    def label(self):
        return f"{self.method.name} {point_label(self.point)} seed {self.seed}"

    @property
    def key(self):
        return (self.method.name, point_label(self.point), self.seed)

    def path(self, *parts):
        return os.path.join(self.folder, *parts)

    def description(self):
        return {"method": self.method.name, "point": {k: v for k, v in self.point.items()},
                "point_label": point_label(self.point), "seed": self.seed, "overrides": self.overrides}

    def result(self):
        """The stored result.json, or None when the run has not finished."""
        path = self.path("result.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)


def run_folder(out, method, point, seed):
    return os.path.join(out, "runs", slug(method.name), slug(point_label(point)), f"seed{seed}")


def check_existing(runs):
    """A ConfigError when a run folder was made by a study with other settings for that run."""
    for run in runs:
        path = run.path("run.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            stored = json.load(f)
        if _jsonable(stored.get("overrides")) != _jsonable(run.overrides):
            changed = sorted(k for k in set(stored.get("overrides", {})) | set(run.overrides)
                             if _jsonable(stored.get("overrides", {}).get(k)) != _jsonable(run.overrides.get(k)))
            raise ConfigError(f"run folder {run.folder} was trained with other settings ({', '.join(changed)} differ); "
                              "use another --out, or delete that folder to retrain it")


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _load_prctl():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl() if sys.platform.startswith("linux") else None  # loaded here: the child must not import


def _die_with_parent():
    """In the child, before exec: ask Linux to send SIGTERM when the study dies, even by SIGKILL, so that no
    orphaned training keeps writing into a run folder the restarted study is about to clear."""
    _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Interrupted(Exception):
    """The study is stopping: a run cut short is left without result.json, so that it runs again next time."""


class Launcher:
    """Runs subprocesses with a thread limit and a log file, and can stop them all (Ctrl-C, a killed study)."""

    def __init__(self, cwd):
        self.cwd = cwd
        self._live = set()
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    def __call__(self, cmd, log_path, threads):
        if self.stopping.is_set():
            raise Interrupted(str(cmd[0]))
        env = commands.thread_env(threads)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (commands.ROOT, env.get("PYTHONPATH")) if p)
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(shlex.quote(str(c)) for c in cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent if _PRCTL is not None else None)
            with self._lock:
                self._live.add(proc)
            try:
                rc = proc.wait()
            finally:
                with self._lock:
                    self._live.discard(proc)
        if self.stopping.is_set():
            raise Interrupted(str(cmd[0]))
        return rc

    def stop_all(self):
        with self._lock:
            self.stopping.set()
            live = list(self._live)
        for proc in live:
            proc.terminate()
        for proc in live:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def last_error_line(log_path):
    """The log's last line that reads like an error, for the one-line failure report."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.rstrip() for line in f if line.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if "error" in line.lower() or "Error" in line or "Traceback" in line:
            return line[-300:]
    return lines[-1][-300:] if lines else ""


def execute_run(run, launcher, threads, student, splits, fars):
    """Train and score one run; returns its result dict (also written to result.json)."""
    if os.path.isdir(run.folder):
        shutil.rmtree(run.folder)  # a killed run leaves a partial folder: start it over
    os.makedirs(run.folder)
    train_cmd = commands.train_command(student["config"], run.overrides)
    eval_cmd = commands.evaluate_command(run.path("train", "model.pt"), student["network"], student["network_kwargs"],
                                         student["input_size"], splits, run.path("eval"), fars)
    report.write_json(run.path("run.json"), dict(run.description(), train_command=train_cmd, eval_command=eval_cmd))
    result = {"status": "failed", "method": run.method.name, "point": run.point, "seed": run.seed}
    started = time.time()
    rc = launcher(train_cmd, run.path("train.log"), threads)
    result["train_seconds"] = time.time() - started
    if rc != 0 or not os.path.isfile(run.path("train", "model.pt")):
        result.update(stage="train", returncode=rc, log=run.path("train.log"),
                      error=last_error_line(run.path("train.log")))
        report.write_json(run.path("result.json"), result)
        return result
    started = time.time()
    rc = launcher(eval_cmd, run.path("eval.log"), threads)
    result["eval_seconds"] = time.time() - started
    metrics_path = run.path("eval", "metrics.json")
    if rc != 0 or not os.path.isfile(metrics_path):
        result.update(stage="eval", returncode=rc, log=run.path("eval.log"),
                      error=last_error_line(run.path("eval.log")))
        report.write_json(run.path("result.json"), result)
        return result
    with open(metrics_path) as f:
        metrics = json.load(f)
    result.update(status="done", metrics={k: v for k, v in metrics.items() if isinstance(v, dict)})
    report.write_json(run.path("result.json"), result)
    return result


def progress_line(run, result, primary, metric_names):
    """'FC fc.weight=30 seed 1: val TAR@1e-4 41.23 | test TAR@1e-3 62.10 ... (train 58 s, eval 14 s)'."""
    if result["status"] != "done":
        line = (f"{run.label}: FAILED in {result.get('stage')} (exit {result.get('returncode')}); "
                f"see {result.get('log')}")
        return line + (f": {result['error']}" if result.get("error") else "")
    val, test = result["metrics"].get("val", {}), result["metrics"].get("test", {})

    def pct(value):
        return "-" if value is None else f"{value * 100:.2f}"

    tests = " ".join(f"{name} {pct(test.get(name))}" for name in metric_names)
    return (f"{run.label}: val {primary} {pct(val.get(primary))} | test {tests} "
            f"(train {result.get('train_seconds', 0):.0f} s, eval {result.get('eval_seconds', 0):.0f} s)")

