"""Result files a user keeps: prettytable text, JSON, CSV and the ROC plot, each written atomically."""
import csv
import io
import json
import math
import os

from prettytable import PrettyTable


def atomic_write(path, data, mode="w"):
    """Write to a temp file beside `path`, then os.replace, so a crash never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _clean(obj):
    """JSON has no NaN: write null instead, so other tools can read the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path, obj):
    atomic_write(path, json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")


def write_csv(path, header, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())


def percent(value):
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else "%.2f" % (value * 100)


def tar_table(rows, far_keys):
    """Upstream's IJB table: 'Methods' + one column per FAR, TAR printed as '%.2f' percent."""
    table = PrettyTable(["Methods"] + list(far_keys))
    for method, tars in rows.items():
        table.add_row([method] + [percent(tars[key]) for key in far_keys])
    return table


def identification_table(results, rank_keys, fpir_keys):
    """One row per gallery (and the mean): rank-k and TPIR@FPIR in percent."""
    table = PrettyTable(["Gallery"] + [f"rank-{k}" for k in rank_keys] + [f"TPIR@FPIR={f}" for f in fpir_keys])
    for name, res in list(results["galleries"].items()) + [("mean", results["mean"])]:
        table.add_row([name] + [percent(res["rank"][k]) for k in rank_keys]
                      + [percent(res["tpir_at_fpir"][f]) for f in fpir_keys])
    return table


def verification_table(results):
    """.bin results: one row per set."""
    keys = sorted({k for res in results.values() for k in res["tar_at_far"]}, key=float)
    table = PrettyTable(["Set", "Accuracy-Flip", "Std", "XNorm", "Best threshold"] + [f"TAR@FAR={k}" for k in keys])
    for name, res in results.items():
        table.add_row([name, "%1.5f" % res["accuracy"], "%1.5f" % res["std"], "%f" % res["xnorm"],
                       "%.2f" % res["best_threshold"]] + [percent(res["tar_at_far"].get(k)) for k in keys])
    return table


def save_roc_png(path, curves, title="ROC on IJB", fars=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)):
    """curves: {label: (fpr, tpr, auc)}; log-x plot with upstream's axes, written atomically."""
    from matplotlib.figure import Figure  # no pyplot: no global backend switch, no GUI

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot(111)
    for label, (fpr, tpr, area) in curves.items():
        ax.plot(fpr, tpr, lw=1, label=f"[{label} (AUC = {area * 100:0.4f} %)]")
    ax.set_xlim([fars[0], fars[-1]])
    ax.set_ylim([0.3, 1.0])
    ax.set_xscale("log")
    ax.set_xticks(list(fars))
    ax.grid(linestyle="--", linewidth=1)
    ax.set_xlabel("False Positive Rate")
    ax.set_ylabel("True Positive Rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="x-small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write(path, buffer.getvalue(), mode="wb")
