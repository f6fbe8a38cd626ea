"""The study's teacher: trained once from its config (or given as weights), scored like every student, and its
embeddings of the training set cached once, so that no student run pays for a teacher forward pass."""
import json
import os
import time

from arcface.errors import ConfigError, DataError
from arcface.eval import report

from . import commands
from .runs import last_error_line
from .validation import check_teacher_cache


def teacher_description(study, rec_overrides):
    """{'weights', 'network', 'network_kwargs', 'embedding_size', 'input_size', 'config', 'overrides'} of the
    teacher the study names; a trained one's weights are the path the runner will write."""
    spec = study.teacher
    if spec.get("config"):
        from arcface.config import load_config

        overrides = dict(rec_overrides, **spec["set"])
        cfg = load_config(spec["config"], [f"{k}={v!r}" for k, v in overrides.items()])
        return {"config": spec["config"], "overrides": overrides, "network": cfg.network,
                "network_kwargs": dict(cfg.network_kwargs or {}), "embedding_size": int(cfg.embedding_size),
                "input_size": int(cfg.input_size), "weights": None}
    weights = spec["weights"]
    if not os.path.isfile(weights):
        raise ConfigError(f"teacher.weights: {weights} does not exist")
    return {"config": None, "overrides": {}, "network": spec["network"],
            "network_kwargs": dict(spec.get("network_kwargs") or {}), "embedding_size": spec.get("embedding_size"),
            "input_size": None, "weights": weights}


def train_teacher(teacher, out, launcher, nproc):
    """Train the teacher under out/teacher (skipped when its result.json says done); returns the model path."""
    folder = os.path.join(out, "teacher")
    model = os.path.join(folder, "train", "model.pt")
    done_file = os.path.join(folder, "result.json")
    overrides = dict(teacher["overrides"], output=os.path.join(folder, "train"))
    if os.path.isfile(done_file):
        with open(done_file) as f:
            done = json.load(f)
        if done.get("overrides") == json.loads(json.dumps(overrides)) and os.path.isfile(model):
            return model, done
        raise ConfigError(f"{folder} holds a teacher trained with other settings; use another --out or delete it")
    cmd = commands.train_command(teacher["config"], overrides, nproc=nproc)
    log = os.path.join(folder, "train.log")
    started = time.time()
    rc = launcher(cmd, log, 1)
    if rc != 0 or not os.path.isfile(model):
        raise DataError(f"training the teacher failed (exit {rc}); see {log}: {last_error_line(log)}")
    done = {"overrides": overrides, "train_seconds": time.time() - started, "command": cmd}
    report.write_json(done_file, done)
    return model, done


def embedding_size_of(teacher):
    """The embedding size of given teacher weights (one forward pass of a blank image)."""
    import torch

    from arcface.eval.embedder import build_network

    model = build_network(teacher["network"], teacher["weights"], teacher["input_size"], teacher["network_kwargs"])
    with torch.no_grad():
        return int(model(torch.zeros(1, 3, teacher["input_size"], teacher["input_size"])).shape[1])


def kd_teacher_overrides(teacher, cache):
    """The kd keys that point a student (or the cache builder) at this teacher and its cache."""
    out = {"kd.teacher_network": teacher["network"], "kd.teacher_network_kwargs": teacher["network_kwargs"],
           "kd.teacher_embedding_size": int(teacher["embedding_size"]), "kd.teacher_weights": teacher["weights"]}
    if cache:
        out.update({"kd.teacher_backend": "cache", "kd.teacher_cache": cache, "kd.teacher_check": False})
    return out


def build_cache(study, teacher, rec_overrides, out, launcher, nproc):
    """The teacher cache: the study's given one (checked against the data), else built once under out/teacher."""
    if study.teacher.get("cache"):
        check_teacher_cache(study.teacher["cache"], study.data["folder"], teacher["input_size"],
                            teacher["embedding_size"], teacher["weights"])
        return study.teacher["cache"]
    path = os.path.join(out, "teacher", "teacher.tcache")
    overrides = dict(rec_overrides, **kd_teacher_overrides(teacher, None))
    overrides["kd.enabled"] = True
    overrides["kd.teacher_check"] = False
    if os.path.isfile(path):
        try:
            check_teacher_cache(path, study.data["folder"], teacher["input_size"], teacher["embedding_size"],
                                teacher["weights"])
            return path
        except ConfigError as err:
            if "incomplete" not in str(err):
                raise ConfigError(f"{path} exists but does not fit this study ({err}); delete it to rebuild") from None
    cmd = commands.distributed_tool("cache_teacher", nproc, study.student, "--out", path, "--no-progress",
                                    *commands.override_args(overrides))
    log = os.path.join(out, "teacher", "cache.log")
    rc = launcher(cmd, log, 1)
    if rc != 0:
        raise DataError(f"building the teacher cache failed (exit {rc}); see {log}: {last_error_line(log)}")
    check_teacher_cache(path, study.data["folder"], teacher["input_size"], teacher["embedding_size"],
                        teacher["weights"])
    return path


def evaluate_teacher(teacher, splits, out, launcher, threads, fars):
    """The teacher's metrics on the splits (scored once, like a student); result under out/teacher/eval."""
    folder = os.path.join(out, "teacher", "eval")
    metrics_file = os.path.join(folder, "metrics.json")
    if os.path.isfile(metrics_file) and os.path.getmtime(metrics_file) >= os.path.getmtime(teacher["weights"]):
        with open(metrics_file) as f:
            stored = json.load(f)
        from .evaluation import metric_name
        if all(metric_name(far) in stored.get("test", {}) for far in fars):
            return stored
    cmd = commands.evaluate_command(teacher["weights"], teacher["network"], teacher["network_kwargs"],
                                    teacher["input_size"], splits, folder, fars)
    log = os.path.join(out, "teacher", "eval.log")
    if launcher(cmd, log, threads) != 0 or not os.path.isfile(metrics_file):
        raise DataError(f"scoring the teacher failed; see {log}: {last_error_line(log)}")
    with open(metrics_file) as f:
        return json.load(f)
