"""The device check's machinery: the table of checks, what a check is given and returns, and running them with
time budgets (in this process, or one child process per group of checks so that a crash, a CUDA error or a hang
of one check cannot take the others with it).

A check is a function `fn(ctx, rec)` registered with `@check(name, ...)` in one of the group modules. It records
its figures with `rec[key] = value`, states what must hold with `rec.expect(condition, message)` (a check with
an unmet expectation fails, with all its figures still reported), may raise `Skip(reason)`, and sets
`rec.summary` to the one line the log shows. Any other exception fails the check with its message.
"""
import contextlib
import fnmatch
import importlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

GROUP_MODULES = ("environment", "data", "training", "distributed", "kd", "speed")  # the order of a run
DEFAULT_TIME_BUDGET_S = 480.0   # a whole default run on one GPU: 8 minutes
QUICK_TIME_BUDGET_S = 180.0     # --quick: a second try inside the same lease
TEST_HANG_ENV = "UKD_DEVICE_CHECK_TEST_HANG"  # tests only: checks (names or globs, comma-separated) that hang
IN_PROCESS_GRACE_S = 30.0       # in-process runs cannot kill a check: the run ends this long after its budget
ISOLATED_GRACE_S = 5.0          # a child is killed this long after its check's budget


class Skip(Exception):
    """The check cannot run here (no CUDA device, a package missing, ...): the message is the reason."""


class CheckFailed(Exception):
    """The check found something wrong; raised by rec.require()."""


def jsonable(value):
    """Plain JSON values from numbers, tensors, numpy scalars, tuples and nested dicts."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    return str(value)


class Recorder:
    """What a check reports: figures, unmet expectations, notes and a one-line summary."""

    def __init__(self):
        self.numbers = {}
        self.failures = []
        self.notes = []
        self.summary = ""

    def __setitem__(self, key, value):
        self.numbers[key] = jsonable(value)

    def __getitem__(self, key):
        return self.numbers[key]

    def update(self, values=None, **kwargs):
        for key, value in dict(values or {}, **kwargs).items():
            self[key] = value

    def expect(self, ok, message):
        """Record `message` as a failure unless `ok`; the check goes on (its later figures are still wanted)."""
        if not ok:
            self.failures.append(str(message))
        return bool(ok)

    def require(self, ok, message):
        """Like expect, but stop the check here (what follows cannot run without it)."""
        if not self.expect(ok, message):
            raise CheckFailed(message)

    def note(self, text):
        self.notes.append(str(text))


@dataclass
class Check:
    name: str
    group: str
    fn: Callable
    what: str                 # one sentence: what the check proves
    needs_cuda: bool
    budget_s: float           # the time it may take on a GPU machine (killed after it when isolated)
    quick: bool               # part of --quick
    quick_budget_s: float

    def budget(self, quick, scale=1.0):
        return (self.quick_budget_s if quick else self.budget_s) * scale


REGISTRY: dict[str, Check] = {}


def check(name, *, what, budget_s, needs_cuda=True, quick=False, quick_budget_s=None):
    """Register `fn(ctx, rec)` as check `name` of the calling module's group."""
    def deco(fn):
        group = fn.__module__.rsplit(".", 1)[-1]
        REGISTRY[name] = Check(name, group, fn, what, needs_cuda, float(budget_s), bool(quick),
                               float(quick_budget_s if quick_budget_s is not None else budget_s))
        return fn
    return deco


def load_checks() -> list[Check]:
    """Every check, in the order of a run (group modules in GROUP_MODULES order, checks in file order)."""
    for module in GROUP_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    order = {g: i for i, g in enumerate(GROUP_MODULES)}
    return sorted(REGISTRY.values(), key=lambda c: order[c.group])  # stable: file order within a group


@dataclass
class Context:
    """What every check is given (JSON-serialisable: it travels to the child processes)."""
    work: str                       # scratch folder: generated data, teachers, caches, logs
    cuda: bool                      # a CUDA device is present
    device: str = "cpu"             # where the checks run: 'cuda' (GPU machine) or 'cpu' (CPU-only / --rehearse)
    quick: bool = False
    rehearse: bool = False          # CUDA checks run on the CPU at toy sizes, to test this script
    toy: bool = True                # toy sizes (CPU) instead of the GPU sizes
    run_start: float = 0.0          # time.time() of the run's start
    time_budget_s: float = DEFAULT_TIME_BUDGET_S
    budget_scale: float = 1.0
    fail_checks: list[str] = field(default_factory=list)
    only: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    deadline: float = math.inf      # end of the running check's budget (set per check)

    def to_json(self):
        data = asdict(self)
        data["deadline"] = None
        return json.dumps(data)

    @classmethod
    def from_json(cls, text):
        data = json.loads(text)
        data["deadline"] = math.inf
        return cls(**data)

    def path(self, *parts):
        """A path under the work folder; its parent folder exists."""
        path = os.path.join(self.work, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def time_left(self):
        return self.deadline - time.time()

    def torch_device(self):
        import torch
        return torch.device("cuda", 0) if self.device == "cuda" else torch.device("cpu")

    def cuda_checks_run(self):
        return self.cuda or self.rehearse


def matches(name, patterns):
    return any(fnmatch.fnmatchcase(name, p) or name == p for p in patterns)


def decide(chk: Check, ctx: Context):
    """(status, reason) when the check is not run, else None."""
    return static_decision(chk, ctx) or time_decision(chk, ctx)


def static_decision(chk: Check, ctx: Context):
    """(status, reason) from the options and the machine alone, else None."""
    if ctx.only and not matches(chk.name, ctx.only):
        return "skipped", "not selected (--only)"
    if matches(chk.name, ctx.skip):
        return "skipped", "not selected (--skip)"
    if matches(chk.name, ctx.fail_checks):
        return "fail", "failure injected by --fail-check (the check did not run)"
    if ctx.quick and not chk.quick:
        return "skipped", "not part of --quick"
    if chk.needs_cuda and not ctx.cuda and not ctx.rehearse:
        return "skipped", "no CUDA device"
    return None


def time_decision(chk: Check, ctx: Context):
    """('skipped', why) when the check's budget no longer fits in the run's, else None."""
    budget = chk.budget(ctx.quick, ctx.budget_scale)
    left = ctx.run_start + ctx.time_budget_s - time.time()
    if budget > left:
        return "skipped", (f"not enough of the run's {ctx.time_budget_s:.0f} s time budget left ({max(left, 0):.0f} s; "
                           f"this check may take {budget:.0f} s)")
    return None


def result_record(chk: Check, status, reason="", rec=None, seconds=0.0, budget=None):
    return {"name": chk.name, "group": chk.group, "what": chk.what, "needs_cuda": chk.needs_cuda,
            "status": status, "reason": reason, "summary": rec.summary if rec else "",
            "numbers": rec.numbers if rec else {}, "notes": rec.notes if rec else [],
            "seconds": round(float(seconds), 3), "budget_s": budget}


def run_one(chk: Check, ctx: Context, on_start=None):
    """Decide, run and time one check in this process; its result record. on_start(chk) is called just
    before a check that is going to run starts."""
    decided = decide(chk, ctx)
    if decided is not None:
        return result_record(chk, *decided)
    if on_start is not None:
        on_start(chk)
    budget = chk.budget(ctx.quick, ctx.budget_scale)
    ctx.deadline = time.time() + budget
    rec = Recorder()
    start = time.perf_counter()
    status, reason = "pass", ""
    try:
        if matches(chk.name, [p for p in os.environ.get(TEST_HANG_ENV, "").split(",") if p]):
            time.sleep(3600)  # tests/test_device_check.py: a check that hangs is killed at its budget
        chk.fn(ctx, rec)
        if rec.failures:
            status, reason = "fail", "; ".join(rec.failures)
    except Skip as exc:
        status, reason = "skipped", str(exc)
    except CheckFailed:
        status, reason = "fail", "; ".join(rec.failures)
    except Exception as exc:  # noqa: BLE001 - a check's error is its result, the run goes on
        status = "fail"
        reason = f"{type(exc).__name__}: {exc}".strip()
        rec.note("traceback: " + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:])
        if rec.failures:
            reason = "; ".join(rec.failures) + "; then " + reason
    finally:
        ctx.deadline = math.inf
    seconds = time.perf_counter() - start
    if status == "pass" and seconds > budget:
        status, reason = "fail", f"took {seconds:.1f} s, over its time budget of {budget:.0f} s"
    return result_record(chk, status, reason, rec, seconds, budget)


def skipped_records(checks, reason):
    return [result_record(c, "skipped", reason) for c in checks]


# ---- running a list of checks --------------------------------------------------------------------------------

def run_in_process(checks, ctx, on_result):
    """Each check in turn in this process. A check that overruns its budget by IN_PROCESS_GRACE_S cannot be
    stopped: the watchdog reports it failed, the rest not run, and ends the program with status 1."""
    results = []
    for index, chk in enumerate(checks):
        budget = chk.budget(ctx.quick, ctx.budget_scale)
        done = threading.Event()

        def watchdog(chk=chk, index=index, budget=budget, done=done):
            if done.wait(budget + IN_PROCESS_GRACE_S):
                return
            hung = result_record(chk, "fail", f"did not finish within its time budget of {budget:.0f} s "
                                              f"(+{IN_PROCESS_GRACE_S:.0f} s); the run was stopped", budget=budget)
            rest = skipped_records(checks[index + 1:], f"not run: {chk.name} hung and the run was stopped")
            on_result(hung, final=rest)
            kill_registered(ctx)
            os._exit(1)

        thread = threading.Thread(target=watchdog, daemon=True)
        thread.start()
        try:
            result = run_one(chk, ctx)
        finally:
            done.set()
        results.append(result)
        on_result(result)
    return results


def _read_events(path, offset):
    """New complete JSON lines of a child's event file from byte offset; (events, new offset)."""
    if not os.path.exists(path):
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    cut = data.rfind(b"\n") + 1
    events = [json.loads(line) for line in data[:cut].splitlines() if line.strip()]
    return events, offset + cut


def _kill_tree(proc):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)


def register_process_group(ctx, pid):
    """Note a process group a check started in a session of its own (torchrun and its workers), so that it is
    killed with the check when the check is killed or its process dies."""
    with open(ctx.path("events", "process_groups"), "a") as f:
        f.write(f"{pid}\n")


def kill_registered(ctx):
    path = os.path.join(ctx.work, "events", "process_groups")
    if not os.path.exists(path):
        return
    with open(path) as f:
        pids = [int(line) for line in f if line.strip()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    os.remove(path)


def _tail(path, chars=1500):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def child_env():
    """The environment of child processes: this package's project root first on PYTHONPATH, so that children
    import the same code whether or not the project is installed."""
    root = project_root()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def project_root():
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def run_isolated(checks, ctx, on_result):
    """Consecutive checks of one group run in one child process (python -m ...device_check.child). A check
    that overruns its budget is killed with its child; a child that dies fails its running check; the group's
    remaining checks then continue in a fresh child."""
    results = []
    pending = []
    for chk in checks:  # what needs no process is decided here (starting one costs seconds of imports)
        decided = static_decision(chk, ctx)
        if decided is None:
            pending.append(chk)
        else:
            results.append(result_record(chk, *decided))
            on_result(results[-1])
    spawn = 0
    while pending:
        group = pending[0].group
        batch = []
        while pending and pending[0].group == group:
            batch.append(pending.pop(0))
        while batch:
            spawn += 1
            events_path = ctx.path("events", f"{spawn:02d}_{group}.jsonl")
            log_path = ctx.path("logs", f"{spawn:02d}_{group}.log")
            ctx_path = ctx.path("events", f"{spawn:02d}_{group}.context.json")
            with open(ctx_path, "w") as f:
                f.write(ctx.to_json())
            cmd = [sys.executable, "-m", f"{__package__}.child", "--context", ctx_path, "--events", events_path,
                   "--checks", ",".join(c.name for c in batch)]
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                                        start_new_session=True, cwd=ctx.work)
            state = {"offset": 0, "running": None, "started": 0.0}
            by_name = {c.name: c for c in batch}
            finished = set()

            def record(res, finished=finished):
                finished.add(res["name"])
                results.append(res)
                on_result(res)

            def consume(state=state, by_name=by_name, events_path=events_path, record=record):
                events, state["offset"] = _read_events(events_path, state["offset"])
                for event in events:
                    if event["event"] == "start":
                        state["running"], state["started"] = by_name[event["name"]], time.time()
                    elif event["event"] == "result":
                        state["running"] = None
                        record(event["result"])

            while True:
                consume()
                code = proc.poll()
                if code is not None:
                    consume()
                    running = state["running"]
                    if running is not None:
                        took = time.time() - state["started"]
                        record(result_record(running, "fail", f"its process died (exit status {code}) after "
                                             f"{took:.1f} s; log {log_path}: ...{_tail(log_path, 600)}",
                                             seconds=took, budget=running.budget(ctx.quick, ctx.budget_scale)))
                    elif not finished:
                        # ended before any check started (an import error, say): fail the first, retry the rest
                        record(result_record(batch[0], "fail", f"its process ended at start-up (exit status "
                                             f"{code}); log {log_path}: ...{_tail(log_path, 600)}"))
                    kill_registered(ctx)
                    break
                running = state["running"]
                if running is not None:
                    budget = running.budget(ctx.quick, ctx.budget_scale)
                    took = time.time() - state["started"]
                    if took > budget + ISOLATED_GRACE_S:
                        _kill_tree(proc)
                        kill_registered(ctx)
                        consume()  # a result written in the last moment wins
                        if running.name not in finished:
                            record(result_record(running, "fail", f"did not finish within its time budget of "
                                                 f"{budget:.0f} s and was killed; log {log_path}: "
                                                 f"...{_tail(log_path, 400)}", seconds=took, budget=budget))
                        break
                time.sleep(0.1)
            batch = [c for c in batch if c.name not in finished]
    return results


def machine_line():
    return f"{platform.node()} | {platform.platform()} | python {platform.python_version()} | {os.cpu_count()} cores"
