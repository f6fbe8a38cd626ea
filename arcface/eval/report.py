"""Result files a user keeps: prettytable text, JSON, CSV and the ROC plot, each written atomically."""
import csv
import io
import json
import math
import os

from prettytable import PrettyTable

from .metrics import impostors_needed


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


NOT_RESOLVED = "-"


def percent(value):
    """'%.2f' percent; '-' for a TAR that was not measured (too few impostor pairs), 'nan' for NaN."""
    if value is None:
        return NOT_RESOLVED
    return "nan" if isinstance(value, float) and math.isnan(value) else "%.2f" % (value * 100)


class NotedTable(PrettyTable):
    """A PrettyTable whose text ends with its footnotes, so every printer of the table prints them too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.notes = []

    def get_string(self, **kwargs):
        text = super().get_string(**kwargs)
        return "\n".join([text] + self.notes)


def unresolved_far_note(far_keys, impostor_counts):
    """The footnote for '-' cells: what each empty FAR needs, and what the data had.

    impostor_counts: {name: impostor pairs} of the rows concerned (empty when unknown)."""
    if not far_keys:
        return None
    needs = ", ".join(f"{key} needs {impostors_needed(float(key)):,}" for key in far_keys)
    had = ", ".join(f"{name} has {count:,}" for name, count in impostor_counts.items())
    return (f"{NOT_RESOLVED} : too few impostor pairs for that FAR to be measured (a FAR needs at least 1/FAR "
            f"impostor pairs: {needs})" + (f"; {had}" if had else ""))


def _sorted_keys(keys):
    return sorted(set(keys), key=float)


def tar_table(rows, far_keys, impostor_pairs=None):
    """Upstream's IJB table: 'Methods' + one column per FAR, TAR printed as '%.2f' percent, '-' with a
    footnote where the pair list has too few impostor pairs. impostor_pairs: one count for all rows, or
    {method: count}; only used to say how many there were."""
    table = NotedTable(["Methods"] + list(far_keys))
    empty = []
    for method, tars in rows.items():
        table.add_row([method] + [percent(tars[key]) for key in far_keys])
        empty += [key for key in far_keys if tars[key] is None]
    counts = {}
    if isinstance(impostor_pairs, dict):
        counts = {m: n for m, n in impostor_pairs.items() if any(rows[m][k] is None for k in far_keys)}
    elif impostor_pairs is not None and empty:
        counts = {"the pair list": int(impostor_pairs)}
    note = unresolved_far_note(_sorted_keys(empty), counts)
    if note:
        table.notes.append(note)
    return table


def identification_table(results, rank_keys, fpir_keys):
    """One row per gallery (and the mean): rank-k and TPIR@FPIR in percent."""
    table = PrettyTable(["Gallery"] + [f"rank-{k}" for k in rank_keys] + [f"TPIR@FPIR={f}" for f in fpir_keys])
    for name, res in list(results["galleries"].items()) + [("mean", results["mean"])]:
        table.add_row([name] + [percent(res["rank"][k]) for k in rank_keys]
                      + [percent(res["tpir_at_fpir"][f]) for f in fpir_keys])
    return table


def verification_table(results):
    """.bin results: one row per set; '-' with a footnote where a set has too few impostor pairs for a FAR."""
    keys = _sorted_keys(k for res in results.values() for k in res["tar_at_far"])
    table = NotedTable(["Set", "Accuracy-Flip", "Std", "XNorm", "Best threshold"] + [f"TAR@FAR={k}" for k in keys])
    empty, counts = [], {}
    for name, res in results.items():
        tars = [res["tar_at_far"].get(k) for k in keys]
        table.add_row([name, "%1.5f" % res["accuracy"], "%1.5f" % res["std"], "%f" % res["xnorm"],
                       "%.2f" % res["best_threshold"]] + [percent(t) for t in tars])
        missing = [k for k, t in zip(keys, tars) if t is None]
        if missing:
            empty += missing
            if "impostor_pairs" in res:
                counts[name] = int(res["impostor_pairs"])
    note = unresolved_far_note(_sorted_keys(empty), counts)
    if note:
        table.notes.append(note)
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
