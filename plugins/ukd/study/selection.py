"""Fair selection: each method's grid point, and the best baseline, are chosen on the validation split only.

The criterion is the mean over seeds of the primary metric on validation; only grid points whose every seed
finished take part (a point that diverged for one seed is not rescued by the others). Ties go to the point listed
first. The test split is never looked at here.
"""
import numpy as np

from .spec import point_label


def point_table(study, results):
    """{method name: [{'point', 'label', 'val': {metric: [per seed]}, 'test': {...}, 'complete'}]} in grid order."""
    table = {}
    for method in study.methods:
        rows = []
        for point in method.points():
            label = point_label(point)
            per_seed = [results.get((method.name, label, seed)) for seed in study.seeds]
            done = [r for r in per_seed if r is not None and r.get("status") == "done"]
            row = {"point": point, "label": label, "complete": len(done) == len(study.seeds),
                   "failed": [seed for seed, r in zip(study.seeds, per_seed)
                              if r is not None and r.get("status") != "done"],
                   "missing": [seed for seed, r in zip(study.seeds, per_seed) if r is None]}
            for split in ("val", "test"):
                row[split] = {}
                for r in done:
                    for name, value in r["metrics"].get(split, {}).items():
                        row[split].setdefault(name, []).append(value)
            rows.append(row)
        table[method.name] = rows
    return table


def val_score(row, primary):
    values = row["val"].get(primary) or []
    if not row["complete"] or not values or any(v is None for v in values):
        return None
    return float(np.mean(values))


def choose_points(study, table):
    """{method name: index of the chosen grid point in table[name], or None when no point is complete}."""
    chosen = {}
    for name, rows in table.items():
        best, best_score = None, None
        for i, row in enumerate(rows):
            score = val_score(row, study.primary)
            if score is not None and (best_score is None or score > best_score):
                best, best_score = i, score
        chosen[name] = best
    return chosen


def best_baseline(study, table, chosen):
    """The baseline whose chosen point has the highest validation score (None when no baseline finished)."""
    best, best_score = None, None
    for method in study.baselines:
        index = chosen.get(method.name)
        if index is None:
            continue
        score = val_score(table[method.name][index], study.primary)
        if best_score is None or score > best_score:
            best, best_score = method.name, score
    return best
