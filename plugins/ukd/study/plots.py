"""The study's two figures: the primary metric against the KD weight (is the chosen weight at an edge of its grid?)
and the test ROC of every method's chosen point (averaged over seeds), with the teacher for reference."""
import io

import numpy as np

from arcface.eval import report


def total_weight(point, method):
    """Sum of every term's weight at a grid point: the x of the weight plot (ties a 2-D grid to one axis)."""
    losses, _ = method.apply(point)
    return float(sum(float(term.get("weight", 0.0)) for term in losses.values()))


def _save(fig, path):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    report.atomic_write(path, buffer.getvalue(), mode="wb")


def plot_primary_vs_weight(path, summary, study):
    """Validation and test panels: mean and 95% interval over seeds of the primary metric at every grid point."""
    from matplotlib.figure import Figure

    from .stats import mean_ci95

    primary = summary["primary"]
    fig = Figure(figsize=(13.5, 4.6))
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    teacher = summary.get("teacher", {})
    ticks = set()
    colours = iter(["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                    "tab:olive", "tab:cyan", "tab:gray"] * 4)
    for method in study.methods:
        colour = next(colours)
        entry = summary["methods"][method.name]
        for ax, split in zip(axes, ("val", "test")):
            if not method.kd_enabled:
                grid = entry["grid"][0]
                if primary in grid[split]:
                    ax.axhline(grid[split][primary] * 100, color=colour, ls="--", lw=1, label=method.name)
                continue
            xs, ys, lo, hi = [], [], [], []
            for point_entry in entry["grid"]:
                values = _values(summary, method, point_entry, split, primary)
                if not values:
                    continue
                xs.append(total_weight(point_entry["point"], method))
                stat = mean_ci95(values, (0.0, 1.0)) if len(values) > 1 else {"mean": values[0],
                                                                               "ci95": [values[0]] * 2}
                ys.append(stat["mean"] * 100)
                lo.append((stat["mean"] - stat["ci95"][0]) * 100)
                hi.append((stat["ci95"][1] - stat["mean"]) * 100)
            if not xs:
                continue
            order = np.argsort(xs, kind="stable")
            xs, ys = np.asarray(xs)[order], np.asarray(ys)[order]
            err = np.asarray([np.asarray(lo)[order], np.asarray(hi)[order]])
            ax.errorbar(xs, ys, yerr=err, color=colour, marker="o", ms=4, lw=1, capsize=3, label=method.name)
            if len({p for axis in method.grid for p in axis.paths}) > 1:  # several weights: say which point is which
                labels = [_short(point_entry["point"]) for point_entry in entry["grid"]
                          if _values(summary, method, point_entry, split, primary)]
                for x, y, text in zip(xs, ys, np.asarray(labels)[order]):
                    ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
            if entry.get("best_weights") is not None:
                chosen = total_weight(entry["best_weights"], method)
                ax.plot([chosen], [ys[list(xs).index(chosen)]], marker="*", ms=14, color=colour, ls="none")
            ticks.update(float(x) for x in xs)
    from matplotlib.ticker import NullFormatter, NullLocator

    for ax, split in zip(axes, ("val", "test")):
        if primary in teacher.get(split, {}) and teacher[split][primary] is not None:
            ax.axhline(teacher[split][primary] * 100, color="black", ls=":", lw=1, label="teacher")
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        shown = readable_ticks(ticks)
        ax.set_xticks(shown)
        ax.set_xticklabels([f"{t:g}" for t in shown], fontsize=8)
        ax.set_xlabel("total KD weight (sum of the terms' weights)")
        ax.set_ylabel(f"{primary} (%)")
        ax.set_title(f"{split}: mean and 95% interval over seeds" + ("  (* = chosen on val)" if split == "val" else ""))
        ax.grid(ls="--", lw=0.5)
    # beside the plots, not over them: a study of a dozen methods fills the axes
    axes[1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.subplots_adjust(left=0.06, right=0.8, wspace=0.22)
    _save(fig, path)


def readable_ticks(values, min_ratio=1.5):
    """The tick positions of a log axis, dropping any within min_ratio of the previous one kept (labels of 100 and
    130 would print over each other)."""
    shown = []
    for value in sorted(v for v in values if v > 0):
        if not shown or value / shown[-1] >= min_ratio:
            shown.append(value)
    return shown


def _short(point):
    """'30/3' for {'iled.weight': 30, 'rpsd.weight': 3}: the values in grid order."""
    from .spec import format_value
    return "/".join(format_value(v) for v in point.values())


def _values(summary, method, point_entry, split, primary):
    """Per-seed values of one grid point, read back from the grid entry's run results."""
    values = point_entry.get(f"{split}_values", {}).get(primary)
    if values is not None:
        return values
    mean = point_entry[split].get(primary)
    return [mean] if mean is not None else []


def plot_roc(path, curves, summary):
    """Log-FPR ROC of the chosen points on test (TPR averaged over seeds at fixed FPRs)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot(111)
    primary = summary["primary"]
    for label, (fpr, tpr) in curves.items():
        name = label.split(" (")[0]
        value = (summary.get("teacher", {}).get("test", {}) if name == "teacher"
                 else (summary["methods"].get(name, {}).get("test") or {}).get(primary, {}))
        value = value.get(primary) if name == "teacher" else (value or {}).get("mean")
        suffix = f" [{primary} {value * 100:.1f}]" if value is not None else ""
        ax.plot(fpr, tpr, lw=1.2, ls=":" if name == "teacher" else "-", label=label + suffix)
    ax.set_xscale("log")
    impostors = summary.get("data", {}).get("test", {}).get("impostor")
    ax.set_xlim(max(1e-6, 1.0 / impostors) if impostors else 1e-6, 1)
    ax.set_ylim(0, 1)
    ax.grid(ls="--", lw=0.5)
    ax.set_xlabel("False accept rate")
    ax.set_ylabel("True accept rate")
    ax.set_title("Test ROC of each method's chosen point (mean over seeds)")
    ax.legend(loc="lower right", fontsize="x-small")
    _save(fig, path)
