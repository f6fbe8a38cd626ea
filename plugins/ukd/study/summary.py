"""What a study concludes: summary.json, summary.md and the plots, from the finished runs.

Per method: the grid point chosen on validation (selection.py), the test metrics of that point as mean and 95% t
interval over seeds, and the paired difference to every baseline on test (the best one, chosen on validation, is also
`vs_best_baseline`) with a bootstrap interval that resamples test subjects and seeds (bootstrap.py). Fractions in
[0, 1] in the json; percent in the markdown.
"""
import os

import numpy as np

from arcface.eval import ijb, report

from .bootstrap import SubjectBootstrap, percentile_interval, seed_pooled
from .evaluation import EvalSplit, metric_name
from .selection import best_baseline, choose_points, point_table, val_score
from .stats import mean_ci95


def _test_scores(run_folder, split):
    feats = np.load(os.path.join(run_folder, "eval", "test_templates.npy"))
    ids = np.load(os.path.join(run_folder, "eval", "test_template_ids.npy"))
    return ijb.score_pairs(feats, ids, np.asarray(split.array("pair_t1")), np.asarray(split.array("pair_t2")),
                           source=f"{split.folder} pair list")


def _interval(values):
    clean = [v for v in values if v is not None]
    if len(clean) < 2 or len(clean) != len(values):
        return None
    out = mean_ci95(clean, bounds=(0.0, 1.0))
    return {"mean": out["mean"], "ci95": out["ci95"], "sd": out["sd"], "values": out["values"]}


class StudySummary:
    """Selection, statistics and the bootstrap of one study's results (see write() for the files)."""

    def __init__(self, study, runs, splits, teacher_metrics=None, teacher_folder=None):
        self.study = study
        self.runs = {run.key: run for run in runs}
        self.results = {run.key: run.result() for run in runs}
        self.results = {k: v for k, v in self.results.items() if v is not None}
        self.val = EvalSplit(splits["val"], "val")
        self.test = EvalSplit(splits["test"], "test")
        self.teacher_metrics = teacher_metrics
        self.teacher_folder = teacher_folder
        self.table = point_table(study, self.results)
        self.chosen = choose_points(study, self.table)
        self.best_baseline = best_baseline(study, self.table, self.chosen)
        counts = self.test.counts
        self.boot_fars = tuple(f for f in study.fars if counts["impostor"] * f >= 1)

    # ------------------------------------------------------------------ bootstrap
    def _bootstrap(self):
        labels = np.asarray(self.test.array("pair_label"))
        return SubjectBootstrap(np.asarray(self.test.array("pair_subject1")),
                                np.asarray(self.test.array("pair_subject2")), labels, self.boot_fars,
                                replicates=self.study.bootstrap, seed=0)

    def _replicates(self, boot, method_name):
        """(point TARs [S, F], replicate TARs [S, B, F]) of a method's chosen point, seeds in study order."""
        row = self.table[method_name][self.chosen[method_name]]
        points, reps = [], []
        for seed in self.study.seeds:
            run = self.runs[(method_name, row["label"], seed)]
            scores = _test_scores(run.folder, self.test)
            points.append(boot.point(scores))
            reps.append(boot.tars(scores))
        return np.asarray(points), np.asarray(reps)

    def _paired_difference(self, method, baseline, draws):
        """{TAR@far: mean, ci95 (subjects and seeds resampled), ci95_subjects_only, per_seed} of method - baseline."""
        (points, reps), (base_points, base_reps) = method, baseline
        diff_points, diff_reps = points - base_points, reps - base_reps  # paired by seed and replicate
        lo, hi = percentile_interval(seed_pooled(diff_reps, draws))
        slo, shi = percentile_interval(seed_pooled(diff_reps))
        return {metric_name(f): {"mean": float(diff_points[:, k].mean()), "ci95": [float(lo[k]), float(hi[k])],
                                 "ci95_subjects_only": [float(slo[k]), float(shi[k])],
                                 "per_seed": [float(v) for v in diff_points[:, k]]}
                for k, f in enumerate(self.boot_fars)}

    # ------------------------------------------------------------------ the json
    def build(self):
        study = self.study
        metrics = study.metric_names()
        out = {"primary": study.primary, "study": study.name, "study_file": study.path, "seeds": list(study.seeds),
               "metrics": metrics, "selection": "each method's grid point by the mean over seeds of the primary "
                                                 "metric on the validation split; test numbers of that point",
               "baselines": [m.name for m in study.baselines], "best_baseline": self.best_baseline,
               "data": {"val": self.val.counts, "test": self.test.counts},
               "bootstrap": {"replicates": study.bootstrap, "resamples": "test subjects (and seeds, for differences)",
                             "fars": [metric_name(f) for f in self.boot_fars]},
               "methods": {}}
        boot = self._bootstrap() if self.boot_fars else None
        replicates = {}
        for method in study.methods:
            rows = self.table[method.name]
            entry = {"baseline": method.baseline, "kd": method.losses is not None,
                     "grid": [{"point": r["point"], "label": r["label"], "complete": r["complete"],
                               "failed_seeds": r["failed"], "missing_seeds": r["missing"],
                               "val": {k: float(np.mean(v)) for k, v in r["val"].items() if None not in v},
                               "test": {k: float(np.mean(v)) for k, v in r["test"].items() if None not in v},
                               "val_values": r["val"], "test_values": r["test"],
                               "val_primary": val_score(r, study.primary)} for r in rows]}
            index = self.chosen[method.name]
            if index is None:
                entry["best_weights"] = None
                entry["note"] = "no grid point finished for every seed"
                out["methods"][method.name] = entry
                continue
            row = rows[index]
            entry["best_weights"] = dict(row["point"])
            entry["best_point"] = row["label"]
            entry["val"] = {k: _interval(row["val"].get(k, [])) for k in metrics}
            entry["test"] = {k: _interval(row["test"].get(k, [])) for k in metrics}
            if boot is not None:
                replicates[method.name] = self._replicates(boot, method.name)
                points, reps = replicates[method.name]
                spread = reps.mean(axis=0).std(axis=0, ddof=1)
                entry["test_bootstrap_sd"] = {metric_name(f): float(s) for f, s in zip(self.boot_fars, spread)}
            out["methods"][method.name] = entry
        if boot is not None and self.best_baseline in replicates:
            draws = boot.seed_draws(len(study.seeds))
            baselines = [m.name for m in study.baselines if m.name in replicates]
            for name, reps in replicates.items():
                entry = out["methods"][name]
                entry["vs_baselines"] = {b: self._paired_difference(reps, replicates[b], draws) for b in baselines}
                entry["vs_best_baseline"] = entry["vs_baselines"][self.best_baseline]
            out["bootstrap"]["fallbacks"] = boot.fallbacks
        if self.teacher_metrics is not None:
            out["teacher"] = {k: v for k, v in self.teacher_metrics.items() if isinstance(v, dict)}
            if boot is not None and self.teacher_folder:
                scores = _test_scores(self.teacher_folder, self.test)
                spread = boot.tars(scores).std(axis=0, ddof=1)
                out["teacher"]["test_bootstrap_sd"] = {metric_name(f): float(s) for f, s in zip(self.boot_fars, spread)}
                out["teacher"]["impostors_above_threshold"] = {
                    metric_name(f): int(round(f * self.test.counts["impostor"])) for f in self.boot_fars}
        planned = len(self.runs)
        failed = [{"run": self.runs[k].label, "stage": r.get("stage"), "log": r.get("log"), "error": r.get("error")}
                  for k, r in self.results.items() if r.get("status") != "done"]
        out["runs"] = {"planned": planned, "done": sum(r.get("status") == "done" for r in self.results.values()),
                       "failed": failed,
                       "train_seconds_mean": _mean([r.get("train_seconds") for r in self.results.values()
                                                    if r.get("status") == "done"]),
                       "eval_seconds_mean": _mean([r.get("eval_seconds") for r in self.results.values()
                                                   if r.get("status") == "done"])}
        return out

    def curves(self):
        """{label: (fpr, mean tpr over seeds)} of each method's chosen point on test, and the teacher's."""
        from arcface.eval.metrics import roc_curve

        grid = np.logspace(-6, 0, 400)
        labels = np.asarray(self.test.array("pair_label"))
        out = {}
        for method in self.study.methods:
            index = self.chosen[method.name]
            if index is None:
                continue
            row = self.table[method.name][index]
            tprs = []
            for seed in self.study.seeds:
                fpr, tpr, _ = roc_curve(labels, _test_scores(self.runs[(method.name, row["label"], seed)].folder,
                                                             self.test))
                tprs.append(np.interp(grid, fpr, tpr))
            out[f"{method.name} ({row['label']})"] = (grid, np.mean(tprs, axis=0))
        if self.teacher_folder:
            fpr, tpr, _ = roc_curve(labels, _test_scores(self.teacher_folder, self.test))
            out["teacher"] = (grid, np.interp(grid, fpr, tpr))
        return out


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _pct(value):
    return "-" if value is None else f"{value * 100:.2f}"


def _pct_interval(entry):
    if not entry:
        return "-"
    lo, hi = entry["ci95"]
    return f"{entry['mean'] * 100:.2f} [{lo * 100:.2f}, {hi * 100:.2f}]"


def _markdown_table(header, rows):
    from prettytable import PrettyTable

    table = PrettyTable(header)
    for row in rows:
        table.add_row(row)
    try:
        from prettytable import TableStyle
        table.set_style(TableStyle.MARKDOWN)
    except ImportError:  # prettytable < 3.12
        from prettytable import MARKDOWN
        table.set_style(MARKDOWN)
    table.align = "l"
    return table.get_string()


def markdown(summary):
    """summary.md: the chosen points on test, the differences to the best baseline, then every grid point."""
    primary, metrics = summary["primary"], summary["metrics"]
    lines = [f"# KD study `{summary['study']}`", "",
             f"Seeds {', '.join(map(str, summary['seeds']))}; primary metric {primary}; grid points chosen on the "
             f"validation split; best baseline (on validation): **{summary['best_baseline']}**. "
             f"Test split: {summary['data']['test']['subjects']} subjects, {summary['data']['test']['templates']} "
             f"templates, {summary['data']['test']['genuine']} genuine and {summary['data']['test']['impostor']} "
             f"impostor pairs. Values in percent: mean [95% interval].", ""]
    rows = []
    teacher = summary.get("teacher")
    for name, entry in summary["methods"].items():
        if entry.get("best_weights") is None:
            rows.append([name, "-", "-"] + ["-"] * len(metrics))
            continue
        rows.append([name + (" (baseline)" if entry["baseline"] else ""), entry["best_point"],
                     _pct_interval(entry["val"].get(primary))] + [_pct_interval(entry["test"].get(m)) for m in metrics])
    if teacher:
        rows.append(["teacher", "-", _pct(teacher.get("val", {}).get(primary))]
                    + [_pct(teacher.get("test", {}).get(m)) for m in metrics])
    lines += ["## Chosen configurations, test split", "",
              _markdown_table(["method", "chosen on val", f"val {primary}"] + [f"test {m}" for m in metrics], rows), ""]
    boot_metrics = summary["bootstrap"]["fars"]
    if summary["best_baseline"] and boot_metrics:
        others = [b for b in summary["baselines"] if b != summary["best_baseline"]]
        for baseline in [summary["best_baseline"]] + others:
            rows = []
            for name, entry in summary["methods"].items():
                diff = entry.get("vs_baselines", {}).get(baseline)
                if diff and name != baseline:
                    rows.append([name] + [_pct_interval(diff.get(m)) for m in boot_metrics])
            if not rows:
                continue
            title = "the best baseline" if baseline == summary["best_baseline"] else "the baseline"
            lines += [f"## Difference to {title} ({baseline}), test split", "",
                      "Paired: the same seeds and the same bootstrap replicates; interval from "
                      f"{summary['bootstrap']['replicates']} replicates resampling test subjects and seeds.", "",
                      _markdown_table(["method"] + [f"Δ {m}" for m in boot_metrics], rows), ""]
    rows = []
    for name, entry in summary["methods"].items():
        for point in entry["grid"]:
            done = len(summary["seeds"]) - len(point["failed_seeds"]) - len(point["missing_seeds"])
            rows.append([name, point["label"], _pct(point["val_primary"]), _pct(point["test"].get(primary)),
                         f"{done}/{len(summary['seeds'])}"])
    lines += ["## Every grid point (mean over seeds)", "",
              _markdown_table(["method", "point", f"val {primary}", f"test {primary}", "seeds done"], rows), ""]
    if summary["runs"]["failed"]:
        lines += ["## Failed runs", ""] + [f"- {f['run']} ({f['stage']}): {f['error']} — `{f['log']}`"
                                           for f in summary["runs"]["failed"]] + [""]
    return "\n".join(lines)


def write(study_summary, out_dir):
    """summary.json, summary.md, primary_vs_weight.png and roc_test.png under out_dir; returns the summary dict."""
    from .plots import plot_primary_vs_weight, plot_roc

    summary = study_summary.build()
    report.write_json(os.path.join(out_dir, "summary.json"), summary)
    report.atomic_write(os.path.join(out_dir, "summary.md"), markdown(summary))
    plot_primary_vs_weight(os.path.join(out_dir, "primary_vs_weight.png"), summary, study_summary.study)
    plot_roc(os.path.join(out_dir, "roc_test.png"), study_summary.curves(), summary)
    return summary
