"""Compare KD methods fairly: every (method, grid point, seed) student trained the same way, the grid point chosen on
validation, test numbers with intervals over seeds and a paired bootstrap against the best baseline.

    python tools/kd_study.py studies/default.py --jobs 2            # the default study (no KD, L2, FC, UKD)
    python tools/kd_study.py studies/default.py --quick             # its quick variant (minutes)
    python tools/kd_study.py my_study.py --out work_dirs/kd_study/mine --jobs 2

A study file defines `study = dict(...)`: the student config, seeds, data, teacher and methods (docs/study.md).
The output folder holds one folder per run (resumable: finished runs are skipped), the teacher, its cache, the
prepared splits, summary.json, summary.md, primary_vs_weight.png and roc_test.png.
"""
import argparse
import logging
import os
import signal
import sys

from arcface.cli import report_errors


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="study file (python, defines `study = dict(...)`)")
    p.add_argument("--quick", action="store_true", help="apply the study file's `quick` replacements")
    p.add_argument("--out", default=None, help="output folder (default: work_dirs/kd_study/<study name>)")
    p.add_argument("--jobs", type=int, default=1, help="trainings run side by side, each with cores/N threads")
    p.add_argument("--threads", type=int, default=None, help="threads per job (default: cores / jobs)")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    p.add_argument("--check", action="store_true", help="only check the study file and every run's config")
    p.add_argument("--summary-only", action="store_true", help="only rewrite the summary from finished runs")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (one line per run still)")
    return p


@report_errors
def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from plugins.ukd.study.runner import StudyRunner
    from plugins.ukd.study.spec import load_study

    if args.jobs < 1:
        print(f"error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    study = load_study(args.study, quick=args.quick)
    out = args.out or os.path.join("work_dirs", "kd_study", study.name)
    runner = StudyRunner(study, out, jobs=args.jobs, threads=args.threads, retry_failed=args.retry_failed,
                         progress=not args.no_progress, log=lambda line: print(line, flush=True))
    if args.check:
        runner.check()
        return 0
    if args.summary_only:
        runner.summarise()
        return 0
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the running trainings as Ctrl-C does
    try:
        runner.run()
    except KeyboardInterrupt:
        print(f"interrupted: the runs cut short will start again when the same command is run again "
              f"(finished ones are kept in {out})", file=sys.stderr)
        return 130
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
