"""Run many ``statemap`` command lines, each in its own child process, fast (used by test_attacks.py).

Usage: ``python tests/attack_runner.py CASES.json RESULTS.json``. CASES is a list of
``{"id", "argv", "cwd", "stdout", "stderr"}``. The runner imports statemap once, then forks
one child per case: the child sets ``RLIMIT_AS`` (``--mem``), points fd 1 and 2 at the case's
files, and runs ``statemap.cli.main(argv)`` -- exactly what the ``statemap`` console script
runs -- exiting with its return value. An exception that escapes ``main`` is printed as a
traceback and exits 1, as Python would. A child still running after ``--timeout`` seconds is
killed. Forking saves the ~0.4 s interpreter start per case, so hundreds of cases take seconds.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"  # no BLAS threads in the parent: forking a threaded process can deadlock

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402


def _child(case: dict, mem: int) -> None:
    try:
        os.chdir(case["cwd"])
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        for fd, name in ((1, case["stdout"]), (2, case["stderr"])):
            f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from statemap.cli import main

        try:
            rc = main(case["argv"])
        except SystemExit as e:
            if isinstance(e.code, int) or e.code is None:
                rc = e.code or 0
            else:
                sys.stderr.write(f"{e.code}\n")
                rc = 1
        except BaseException:  # noqa: BLE001 - what Python itself would do: a traceback, exit 1
            traceback.print_exc()
            rc = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(rc))
    except BaseException:  # noqa: BLE001
        os._exit(99)


def run_batch(
    argvs: list[tuple[str, list[str], str]], root: str, mem: int = 2 << 30, timeout: float = 20.0, jobs: int = 4
) -> dict:
    """Run ``(id, argv, cwd)`` command lines through this runner (a subprocess); id -> result.

    Each result: ``rc`` (None on timeout), ``timeout``, ``seconds``, ``stdout``, ``stderr``.
    """
    import subprocess
    from pathlib import Path

    base = Path(root)
    todo = [
        {"id": cid, "argv": argv, "cwd": cwd, "stdout": str(base / f"r{n:05d}.out"), "stderr": str(base / f"r{n:05d}.err")}
        for n, (cid, argv, cwd) in enumerate(argvs)
    ]
    (base / "cases.json").write_text(json.dumps(todo))
    here = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, str(base / "cases.json"), str(base / "results.json")]
    cmd += ["--mem", str(mem), "--timeout", str(timeout), "--jobs", str(jobs)]
    subprocess.run(cmd, check=True, env=env, timeout=1800)
    res = json.loads((base / "results.json").read_text())
    for t in todo:
        r = res[t["id"]]
        r["stdout"] = Path(t["stdout"]).read_text(errors="replace")
        r["stderr"] = Path(t["stderr"]).read_text(errors="replace")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases")
    ap.add_argument("results")
    ap.add_argument("--mem", type=int, default=2 << 30)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--jobs", type=int, default=4)
    a = ap.parse_args()
    # what the commands import anyway, once, before forking
    import numpy  # noqa: F401
    import rich.console  # noqa: F401
    import rich.table  # noqa: F401
    import yaml  # noqa: F401

    import statemap.api  # noqa: F401
    import statemap.cli  # noqa: F401
    import statemap.diff  # noqa: F401
    import statemap.inspect  # noqa: F401
    import statemap.report  # noqa: F401

    with open(a.cases) as f:
        cases = json.load(f)
    todo = list(reversed(cases))
    running: dict[int, tuple[str, float]] = {}
    results: dict[str, dict] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    while todo or running:
        while todo and len(running) < a.jobs:
            case = todo.pop()
            pid = os.fork()
            if pid == 0:
                _child(case, a.mem)
            running[pid] = (case["id"], time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic()
            for p, (cid, t0) in list(running.items()):
                if now - t0 > a.timeout and cid not in results:
                    os.kill(p, signal.SIGKILL)
                    results[cid] = {"rc": None, "timeout": True, "seconds": now - t0}
            time.sleep(0.005)
            continue
        cid, t0 = running.pop(pid)
        if cid in results:  # killed on timeout
            continue
        rc = os.waitstatus_to_exitcode(status)
        results[cid] = {"rc": rc, "timeout": False, "seconds": time.monotonic() - t0}
    with open(a.results, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
