"""One prepared check of every CUDA path and speed claim, for the few minutes a GPU machine is lent: CUDA fp16
with the GradScaler and bf16 through the trainer, torchrun with NCCL, DALI's GPU decoder, the loader's side-stream
prefetch, the KD plugin's teacher and cache on CUDA, and the speed ratios, all on generated data (no network).

    python tools/device_check.py --out DIR            # everything, at most 8 minutes on one GPU
    python tools/device_check.py --out DIR --quick    # a subset for a second try in the same lease (~2.5 min)
    python tools/device_check.py --list               # the checks, their budgets and what each proves

Writes DIR/report.json, DIR/report.md and DIR/device_check.log; exits 1 if any check failed, else 0. Without a
CUDA device the checks that need one are reported "skipped: no CUDA device" and what is meaningful on a CPU runs
at toy sizes (a minute or so). See docs/device_check.md.
"""
import argparse
import datetime
import os
import shlex
import shutil
import sys
import tempfile
import time


class _Tee:
    def __init__(self, path):
        self.file = open(path, "a")  # noqa: SIM115 - the run's log, open until the end of main

    def __call__(self, line=""):
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def build_parser():
    from plugins.ukd.device_check.core import DEFAULT_TIME_BUDGET_S, QUICK_TIME_BUDGET_S
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="device_check_report", help="folder of report.json, report.md and the log "
                   "(default: ./device_check_report)")
    p.add_argument("--quick", action="store_true", help="only the checks marked quick, with smaller budgets")
    p.add_argument("--only", nargs="+", default=[], metavar="NAME", help="run only these checks (names or globs, "
                   "e.g. 'train.*'); the others are reported as not selected")
    p.add_argument("--skip", nargs="+", default=[], metavar="NAME", help="leave these checks out (names or globs)")
    p.add_argument("--fail-check", nargs="+", default=[], metavar="NAME",
                   help="report these checks (names or globs) as failed without running them: to test that a "
                        "failure reaches the report and the exit status")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help=f"seconds for the whole run (default {DEFAULT_TIME_BUDGET_S:.0f}, with --quick "
                        f"{QUICK_TIME_BUDGET_S:.0f}): a check whose budget no longer fits is skipped")
    p.add_argument("--budget-scale", type=float, default=1.0, metavar="F",
                   help="multiply every check's time budget (they are set for a GPU machine)")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="run each group of checks in its own process, so that a crash, a CUDA error or a hang "
                        "fails one check and not the run (auto: yes with CUDA, no on a CPU-only machine)")
    p.add_argument("--rehearse", action="store_true",
                   help="run the CUDA checks too, on the CPU at toy sizes (gloo for NCCL, DALI's CPU decoder for "
                        "'mixed'): tests this script where no GPU is; the figures mean nothing")
    p.add_argument("--sizes", choices=("auto", "gpu", "toy"), default="auto",
                   help="data and network sizes: gpu (112 px, full networks, batch 64-512) or toy (32 px, quarter "
                        "widths); auto: gpu on a CUDA device, toy on the CPU")
    p.add_argument("--work", default=None, help="scratch folder for generated data, teachers, caches and the "
                   "checks' logs (default: a new temporary folder, removed at the end unless --keep-work)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    return p


def main(argv=None):
    from plugins.ukd.device_check import core, report
    args = build_parser().parse_args(argv)
    checks = core.load_checks()
    if args.list:
        print(f"{'check':26s} {'CUDA':5s} {'budget s':>8s} {'quick s':>8s}  what it proves")
        for c in checks:
            quick = f"{c.quick_budget_s:8.0f}" if c.quick else f"{'-':>8s}"
            print(f"{c.name:26s} {'yes' if c.needs_cuda else 'no':5s} {c.budget_s:8.0f} {quick}  {c.what}")
        return 0
    import torch
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda and not args.rehearse else "cpu"
    toy = args.sizes == "toy" or (args.sizes == "auto" and device == "cpu")
    budget = args.time_budget or (core.QUICK_TIME_BUDGET_S if args.quick else core.DEFAULT_TIME_BUDGET_S)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="ukd_device_check_"))
    os.makedirs(work, exist_ok=True)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    ctx = core.Context(work=work, cuda=cuda, device=device, quick=args.quick, rehearse=args.rehearse, toy=toy,
                       run_start=time.time(), time_budget_s=budget, budget_scale=args.budget_scale,
                       fail_checks=list(args.fail_check), only=list(args.only), skip=list(args.skip))
    isolate = args.isolate == "yes" or (args.isolate == "auto" and cuda)
    mode = (f"{'quick' if args.quick else 'default'}; device {device}"
            f"{' (rehearsal of the CUDA checks on the CPU)' if args.rehearse else ''}; {'toy' if toy else 'GPU'} sizes;"
            f" {'one process per group' if isolate else 'in one process'}; time budget {budget:.0f} s"
            f"{f' x{args.budget_scale:g} per check' if args.budget_scale != 1 else ''}")
    words = [sys.argv[0]] + list(argv if argv is not None else sys.argv[1:])
    gpu = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
    meta = {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "start_time": ctx.run_start,
            "command": " ".join(shlex.quote(a) for a in words), "mode": mode,
            "machine": f"{core.machine_line()} | torch {torch.__version__} | {gpu}", "work": work}
    log = _Tee(os.path.join(out, "device_check.log"))
    log(f"device check: {mode}")
    log(f"  report: {out}/report.md, scratch: {work}")
    results = []
    order = {c.name: i for i, c in enumerate(checks)}

    def on_result(result, final=None):
        results.append(result)
        results.sort(key=lambda r: order[r["name"]])  # the report in the run's order, whenever decided
        elapsed = time.time() - ctx.run_start
        text = "pass: " + result["summary"] if result["status"] == "pass" else f"{result['status']}: {result['reason']}"
        log(f"[{elapsed:6.1f} s] {result['name']:26s} {result['seconds']:6.1f} s  {text}")
        if final is not None:
            results.extend(final)
            results.sort(key=lambda r: order[r["name"]])
            for r in final:
                log(f"{'':10s} {r['name']:26s} {'':8s}  {r['status']}: {r['reason']}")
        report.write(out, meta, results, finished=final is not None)

    report.write(out, meta, results)
    try:
        (core.run_isolated if isolate else core.run_in_process)(checks, ctx, on_result)
    except KeyboardInterrupt:
        done = {r["name"] for r in results}
        results.extend(core.skipped_records([c for c in checks if c.name not in done], "not run: interrupted"))
        results.sort(key=lambda r: order[r["name"]])
        log("interrupted")
    final = report.write(out, meta, results, finished=True)
    counts = final["summary"]
    log(f"device check: {counts['pass']} pass, {counts['fail']} fail, {counts['skipped']} skipped in "
        f"{final['seconds']:.0f} s; exit status {final['exit_status']}; {out}/report.md")
    log.close()
    if not args.keep_work and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return final["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
