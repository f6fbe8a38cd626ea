"""The commands a study launches, built in this one place (so a moved tool changes one line).

Each job is the project's own command-line tool in a subprocess, exactly what a user would type: the study trains
with the training tool's semantics and nothing else. A tool is run as `python -m <package module>` when that module
exists, else as the script under tools/.
"""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

TOOLS = {  # name: (module, script under tools/)
    "train": ("arcface.tools.train", "train.py"),
    "make_synthetic": ("arcface.tools.make_synthetic", "make_synthetic.py"),
    "cache_teacher": ("plugins.ukd.tools.cache_teacher", "cache_teacher.py"),
    "evaluate_run": ("plugins.ukd.study.evaluate_run", None),
}


def _tool(name):
    """['-m', module] or [script path]: how python is told to run tool `name`."""
    module, script = TOOLS[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if found or script is None:
        return ["-m", module]
    return [os.path.join(ROOT, "tools", script)]


def python_tool(name, *args):
    return [sys.executable, *_tool(name), *[str(a) for a in args]]


def distributed_tool(name, nproc, *args):
    """torchrun --standalone --nproc_per_node=N for the tool (one process: plain python)."""
    if nproc <= 1:
        return python_tool(name, *args)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *_tool(name), *[str(a) for a in args]]


def override_args(overrides):
    """--set arguments for {key: value}: every value as a python literal, so strings stay strings."""
    return ["--set", *[f"{key}={value!r}" for key, value in overrides.items()]] if overrides else []


def train_command(config, overrides, nproc=1):
    return distributed_tool("train", nproc, config, *override_args(overrides))


def cache_teacher_command(config, out, overrides):
    return python_tool("cache_teacher", config, "--out", out, "--no-progress", *override_args(overrides))


def make_synthetic_command(out, options):
    """tools/make_synthetic.py --out OUT --<key-with-dashes> VALUE ... for the study's make_synthetic dict."""
    args = ["--out", out, "--no-progress"]
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if isinstance(value, bool):
            if value:
                args.append(flag)
        else:
            args += [flag, value]
    return python_tool("make_synthetic", *args)


def evaluate_command(model, network, network_kwargs, input_size, splits, out, fars, batch_size=256):
    import json
    args = ["--model", model, "--network", network, "--network-kwargs", json.dumps(network_kwargs or {}),
            "--input-size", input_size, "--out", out, "--batch-size", batch_size,
            "--fars", ",".join(repr(float(f)) for f in fars)]
    for name, folder in splits.items():
        args += ["--split", f"{name}={folder}"]
    return python_tool("evaluate_run", *args)


def thread_env(threads):
    """The environment of a job limited to `threads` CPU threads (OpenMP, MKL and torch's intra-op pool)."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(max(1, int(threads)))
    return env
