"""report.json and report.md of a device check run, rewritten after every check so that a run stopped midway
still leaves what it found."""
import json
import os
import time

SCHEMA = 1
STATUSES = ("pass", "fail", "skipped")


def summary_counts(results):
    counts = {s: 0 for s in STATUSES}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def exit_status(results):
    """0 when no check failed (passes and skips only), else 1."""
    return 1 if any(r["status"] == "fail" for r in results) else 0


def _atomic_write(path, text):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def build(meta, results, finished):
    return {"schema": SCHEMA, **meta, "finished": finished,
            "seconds": round(time.time() - meta["start_time"], 1),
            "summary": summary_counts(results), "exit_status": exit_status(results), "checks": results}


def write(out_dir, meta, results, finished=False):
    """Write report.json and report.md in out_dir; returns the report dict."""
    os.makedirs(out_dir, exist_ok=True)
    report = build(meta, results, finished)
    _atomic_write(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1) + "\n")
    _atomic_write(os.path.join(out_dir, "report.md"), markdown(report))
    return report


def _fmt(value):
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}" if abs(value) < 100 else f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        if len(value) > 12:
            return "[" + ", ".join(_fmt(v) for v in value[:6]) + f", ... ({len(value)} values) ..., " + \
                ", ".join(_fmt(v) for v in value[-3:]) + "]"
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(report):
    counts = report["summary"]
    lines = ["# Device check report", ""]
    state = "finished" if report["finished"] else "INCOMPLETE (the run stopped or is still running)"
    lines += [f"- run: {state}; {report['seconds']} s; exit status {report['exit_status']}",
              f"- result: **{counts['pass']} pass, {counts['fail']} fail, {counts['skipped']} skipped**",
              f"- mode: {report['mode']}",
              f"- command: `{report['command']}`",
              f"- started: {report['started']}",
              f"- machine: {report['machine']}", ""]
    env = next((r for r in report["checks"] if r["name"] == "environment"), None)
    if env and env["numbers"]:
        lines += ["## Environment", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in env["numbers"].items()]
        lines.append("")
    lines += ["## Checks", "", "| check | status | s | budget s | summary, or why not pass |", "|---|---|---|---|---|"]
    for r in report["checks"]:
        text = r["summary"] if r["status"] == "pass" else f"{r['status']}: {r['reason']}"
        if r["status"] == "fail" and r["summary"]:
            text += f" ({r['summary']})"
        status = "**FAIL**" if r["status"] == "fail" else r["status"]
        budget = "" if r["budget_s"] is None else f"{r['budget_s']:.0f}"
        lines.append(f"| {r['name']} | {status} | {r['seconds']:.1f} | {budget} | {_fmt(text)[:400]} |")
    lines += ["", "## Details", ""]
    for r in report["checks"]:
        if r["status"] == "skipped" and not r["numbers"]:
            continue
        lines += [f"### {r['name']}: {r['status']}", "", r["what"], ""]
        if r["reason"]:
            lines += [f"Reason: {_fmt(r['reason'])}", ""]
        if r["numbers"]:
            lines += ["| figure | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in r["numbers"].items()]
            lines.append("")
        for note in r["notes"]:
            if note.startswith("traceback: "):
                lines += ["```", note[len("traceback: "):].rstrip(), "```", ""]
            else:
                lines += [f"- {note}"]
        if r["notes"]:
            lines.append("")
    return "\n".join(lines) + "\n"
