"""The main job end to end on procedural faces, on a laptop-class CPU (what `make demo` runs).

1. generate procedural faces (training rec, held-out .bin pairs, an IJB-style folder)
2. train the teacher (half-width iResNet-34), cache its embeddings of the training set once
3. train the same student (half-width MobileFaceNet) three ways: no KD, feature consistency, UKD (ILED +
   relational RPSD with the teacher's class centres, the KD studies' choice)
4. evaluate all four on the held-out .bin pairs and the IJB-style folder
5. print one table (accuracy, TAR@FAR, train time) and write an ROC plot of the four models

Every step is a plain command, printed before it runs; copy any of them to run it alone. Training uses
`torchrun --standalone --nproc_per_node=2` (gloo on CPU). Re-running reuses finished steps (model.pt present);
--fresh starts over.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from arcface.cli import report_errors
from arcface.errors import ConfigError

ROOT = os.getcwd()  # the project checkout: configs/synth_*.py and tools/ are read from here

DATA = "data/synth"
SIZE = 32
CACHE = "work_dirs/synth_teacher/teacher.tcache"
KD_CONFIGS = ("synth_mbf_fc", "synth_mbf_ukd")
MODELS = [  # (label, config, network, width)
    ("teacher r34-0.5", "synth_teacher", "r34", 0.5),
    ("student mbf-0.5, no KD", "synth_mbf", "mbf", 0.5),
    ("student mbf-0.5 + FC", "synth_mbf_fc", "mbf", 0.5),
    ("student mbf-0.5 + UKD", "synth_mbf_ukd", "mbf", 0.5),
]


def run(cmd, env=None):
    print(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    started = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, env=env)
    return time.time() - started


def python(script, *args):
    return [sys.executable, os.path.join("tools", script), *args]


def run_demo(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="tables, json and the ROC plot")
    p.add_argument("--nproc", type=int, default=min(2, os.cpu_count() or 1), help="torchrun processes")
    p.add_argument("--fresh", action="store_true", help="regenerate data and retrain everything")
    p.add_argument("--epochs", type=int, default=None, help="override num_epoch of every model (quick runs)")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(ROOT, "configs", "synth_mbf.py")):
        raise ConfigError(f"the demo runs from the project checkout (configs/synth_*.py, tools/); {ROOT} has no "
                          "configs/synth_mbf.py: cd into the checkout, then run `make demo`")
    out = os.path.join(ROOT, args.out)
    if args.fresh:
        for path in [os.path.join(ROOT, DATA), out] + [os.path.join(ROOT, "work_dirs", m[1]) for m in MODELS]:
            shutil.rmtree(path, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    times_path = os.path.join(out, "train_times.json")
    times = json.load(open(times_path)) if os.path.isfile(times_path) else {}
    demo_started = time.time()

    print("== 1/4 procedural faces", flush=True)
    run(python("make_synthetic.py", "--out", DATA, "--num-ids", "500", "--per-id", "24", "--size", str(SIZE),
               "--seed", "0", "--val-ids", "150", "--pairs", "3000", "--ijb-ids", "100", "--ijb-name", "IJBC",
               "--ijb-impostor-ratio", "100", "--no-progress"))

    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.nproc)))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    print("\n== 2/4 training: teacher, its embedding cache, then the student without KD, with FC, with UKD",
          flush=True)
    for label, config, network, width in MODELS:
        model = os.path.join(ROOT, "work_dirs", config, "model.pt")
        if os.path.isfile(model) and config in times:
            print(f"\n{label}: reusing {os.path.relpath(model, ROOT)} (--fresh retrains)")
            continue
        overrides = [f"num_epoch={args.epochs}"] if args.epochs else []
        if config in KD_CONFIGS:
            # the teacher runs once (cache build) instead of on every student batch; it was evaluated just above
            if not os.path.isfile(os.path.join(ROOT, CACHE)):
                times["teacher cache"] = run(python("cache_teacher.py", f"configs/{config}.py", "--out", CACHE,
                                                    "--no-progress"), env=env)
            overrides += ["kd.teacher_backend=cache", f"kd.teacher_cache={CACHE}", "kd.teacher_check=False"]
        cmd = [torchrun, "--standalone", f"--nproc_per_node={args.nproc}", "tools/train.py",
               f"configs/{config}.py"] + (["--set", *overrides] if overrides else [])
        times[config] = run(cmd, env=env)
        with open(times_path + ".tmp", "w") as f:
            json.dump(times, f, indent=1)
        os.replace(times_path + ".tmp", times_path)

    print("\n== 3/4 evaluation on held-out identities", flush=True)
    results = {}
    for label, config, network, width in MODELS:
        model = f"work_dirs/{config}/model.pt"
        kwargs = json.dumps({"width": width})
        res_dir = os.path.join(args.out, config)
        run(python("eval_verification.py", "--model-prefix", model, "--network", network, "--network-kwargs",
                   kwargs, "--input-size", str(SIZE), "--data-dir", DATA, "--targets", "synth_val",
                   "--result-dir", res_dir, "--no-progress"))
        run(python("eval_ijb.py", "--model-prefix", model, "--network", network, "--network-kwargs", kwargs,
                   "--input-size", str(SIZE), "--image-path", f"{DATA}/IJBC", "--target", "IJBC", "--job", config,
                   "--result-dir", os.path.join(res_dir, "ijbc"), "--save-scores", "--no-progress"))
        results[config] = {
            "verification": json.load(open(os.path.join(ROOT, res_dir, "verification.json")))["synth_val"],
            "ijb": next(iter(json.load(open(os.path.join(ROOT, res_dir, "ijbc", "tar_at_far.json"))).values())),
            "scores": os.path.join(ROOT, res_dir, "ijbc", "scores_ijbc_N1D1F1.npy"),
        }

    print("\n== 4/4 results", flush=True)
    summary = summarise(results, times, out)
    print(summary)
    if "teacher cache" in times:
        print(f"(the KD students read the teacher's embeddings from a cache built once in "
              f"{times['teacher cache']:.0f} s: {CACHE})")
    print(f"\nwhole demo: {time.time() - demo_started:.0f} s; table in {args.out}/results.txt, "
          f"ROC in {args.out}/roc_ijbc.png")
    return results


@report_errors
def main(argv=None):
    run_demo(argv)
    return 0


def summarise(results, times, out):
    import numpy as np
    from prettytable import PrettyTable

    from arcface.eval import ijb_io, report
    from arcface.eval.ijb import verification_metrics

    table = PrettyTable(["model", "params", "train s", "synth_val acc", "val TAR@1e-2", "IJB TAR@1e-3",
                         "IJB TAR@1e-2", "IJB AUC"])
    from arcface.backbones import get_model
    pairs = ijb_io.read_template_pairs(os.path.join(ROOT, DATA, "IJBC"), "IJBC")
    curves, rows = {}, {}
    for label, config, network, width in MODELS:
        r = results[config]
        params = sum(p.numel() for p in get_model(network, input_size=SIZE, num_features=128,
                                                  width=width).parameters())
        metrics = verification_metrics(np.load(r["scores"]), pairs.label)
        curves[label] = (metrics["fpr"], metrics["tpr"], metrics["auc"])
        ver, tars = r["verification"], r["ijb"]
        table.add_row([label, f"{params / 1e6:.2f}M", f"{times.get(config, float('nan')):.0f}",
                       f"{ver['accuracy'] * 100:.2f} +- {ver['std'] * 100:.2f}",
                       report.percent(ver["tar_at_far"].get("0.01")), report.percent(tars.get("0.001")),
                       report.percent(tars.get("0.01")), f"{metrics['auc'] * 100:.2f}"])
        rows[config] = {"label": label, "params": params, "train_seconds": times.get(config),
                        "synth_val": {k: ver[k] for k in ("accuracy", "std", "tar_at_far")},
                        "ijbc_tar_at_far": tars, "ijbc_auc": metrics["auc"]}
    report.save_roc_png(os.path.join(out, "roc_ijbc.png"), curves, title="ROC on the procedural IJB-C",
                        fars=(1e-4, 1e-3, 1e-2, 1e-1))
    text = table.get_string()
    report.atomic_write(os.path.join(out, "results.txt"), text + "\n")
    report.write_json(os.path.join(out, "results.json"), rows)
    return text


if __name__ == "__main__":
    sys.exit(main())
