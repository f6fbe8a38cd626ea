"""tools/device_check.py as a CPU-only machine runs it: report files, skip reasons, exit status, an injected
failure, a check that hangs in an isolated run, and (slow) a rehearsal of every CUDA check on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "device_check.py"

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the CPU-only behaviour")


def run(tmp_path, *args, env=None, timeout=300):
    out = tmp_path / "report"
    cmd = [sys.executable, str(TOOL), "--out", str(out), "--work", str(tmp_path / "work"), *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return proc, report, out


def by_name(report):
    return {c["name"]: c for c in report["checks"]}


def listed():
    from plugins.ukd.device_check.core import load_checks
    return load_checks()


@no_cuda
def test_cpu_run_skips_the_cuda_checks_and_passes_the_rest(tmp_path):
    proc, report, out = run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["finished"] and report["exit_status"] == 0 and report["schema"] == 1
    checks = by_name(report)
    assert list(checks) == [c.name for c in listed()]  # every check reported, in the run's order
    for chk in listed():
        got = checks[chk.name]
        assert set(got) >= {"name", "status", "reason", "numbers", "seconds", "budget_s", "what"}
        if chk.needs_cuda:
            assert (got["status"], got["reason"]) == ("skipped", "no CUDA device"), got
            assert f"{chk.name}" in proc.stdout and "skipped: no CUDA device" in proc.stdout
        else:
            assert got["status"] == "pass", got
            assert got["numbers"] and got["seconds"] <= got["budget_s"]
    env = checks["environment"]["numbers"]
    assert env["cuda_available"] is False and env["gpu_count"] == 0 and env["torch"] == torch.__version__
    assert checks["train.mbf.fp32"]["numbers"]["steps"] == len(checks["train.mbf.fp32"]["numbers"]["losses"])
    md = (out / "report.md").read_text()
    assert "# Device check report" in md and "| data.prefetch | skipped |" in md
    assert md.count("skipped: no CUDA device") == sum(c.needs_cuda for c in listed())
    log = (out / "device_check.log").read_text()
    assert "skipped: no CUDA device" in log and "exit status 0" in log
    assert report["seconds"] < 120
    assert not (tmp_path / "work" / "events").exists()  # in one process on a CPU-only machine


def test_an_injected_failure_makes_the_exit_status_nonzero(tmp_path):
    proc, report, out = run(tmp_path, "--only", "environment", "data.faces", "--fail-check", "data.faces")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = by_name(report)
    assert checks["environment"]["status"] == "pass"
    assert checks["data.faces"]["status"] == "fail" and "--fail-check" in checks["data.faces"]["reason"]
    assert checks["train.mbf.fp32"]["reason"] == "not selected (--only)"
    assert report["exit_status"] == 1 and report["summary"]["fail"] == 1
    assert "**FAIL**" in (out / "report.md").read_text()
    assert "exit status 1" in proc.stdout


@pytest.mark.slow
def test_isolated_run_kills_a_hanging_check_and_goes_on(tmp_path):
    """One process per group: a check that hangs is killed at its budget, its group's next check runs in a fresh
    process (data.prefetch, rehearsed on the CPU), and the other groups are not touched."""
    proc, report, _ = run(tmp_path, "--isolate", "yes", "--rehearse", "--only", "environment", "data.faces",
                          "data.prefetch", "--budget-scale", "0.15", env={"UKD_DEVICE_CHECK_TEST_HANG": "data.faces"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = by_name(report)
    assert checks["environment"]["status"] == "pass"
    hung = checks["data.faces"]
    assert hung["status"] == "fail" and "killed" in hung["reason"] and hung["seconds"] >= hung["budget_s"]
    assert checks["data.prefetch"]["status"] == "pass", checks["data.prefetch"]
    events = sorted(os.listdir(tmp_path / "work" / "events"))
    assert sum(name.endswith("_data.jsonl") for name in events) == 2  # the data group restarted once
    assert sum(name.endswith(".jsonl") for name in events) == 3       # no process for the checks not selected


def test_list_and_quick_selection(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), "--list"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), check=False)
    assert proc.returncode == 0
    for chk in listed():
        assert chk.name in proc.stdout
    quick = [c for c in listed() if c.quick]
    assert {"environment", "train.mbf.fp16", "dist.partial_fc", "speed.backbones"} <= {c.name for c in quick}
    assert sum(c.quick_budget_s for c in quick) < sum(c.budget_s for c in listed())


@pytest.mark.slow
@pytest.mark.dist
def test_rehearsal_runs_every_cuda_check_on_the_cpu(tmp_path):
    """--rehearse: the CUDA checks' code on the CPU at toy sizes (gloo for NCCL, DALI's CPU decoder), each group
    in its own process; an injected failure travels back from a child process."""
    proc, report, _ = run(tmp_path, "--rehearse", "--isolate", "yes", "--fail-check", "speed.kd_losses",
                            timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = by_name(report)
    for name, got in checks.items():
        if name == "speed.kd_losses":
            assert got["status"] == "fail" and "--fail-check" in got["reason"]
        elif name.startswith("data.dali") and got["status"] == "skipped":
            assert "DALI" in got["reason"]  # no DALI installed here
        else:
            assert got["status"] == "pass", (name, got["reason"], got["notes"][-1:] if got["notes"] else "")
    assert checks["dist.partial_fc"]["numbers"]["backend"] == "gloo"
    fp16 = checks["train.mbf.fp16"]["numbers"]
    assert fp16["first_step_rel_diff"] <= fp16["first_step_rtol"] <= 3e-2
    assert report["mode"].startswith("default; device cpu (rehearsal")
