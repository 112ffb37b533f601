"""The ``statemap`` command's own process ends with ``os._exit`` once its output is flushed
(statemap.cli._leave): the interpreter's teardown is skipped only when nothing needs it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from safetensors.numpy import save_file

# the interpreter's teardown starts with threading's exit callbacks (not counted as atexit ones)
CHILD = """
import sys, threading
threading._register_atexit(lambda: sys.stderr.write("teardown ran\\n"))
{setup}
sys.argv = ["statemap", *{argv!r}]
from statemap.cli import main
raise SystemExit(main())
"""


def _run(argv: list[str], setup: str = "") -> subprocess.CompletedProcess[str]:
    code = CHILD.format(setup=setup, argv=argv)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _model(tmp_path):
    sd = {f"m.{i}.w": np.full((4, 3), i, np.float32) for i in range(50)}
    save_file(sd, str(tmp_path / "in.safetensors"))
    return tmp_path / "in.safetensors"


def test_a_conversion_ends_without_the_teardown_and_its_output_is_complete(tmp_path):
    src = _model(tmp_path)
    spec = tmp_path / "s.yaml"
    spec.write_text("name: t\nversion: 1\nrules:\n  - rename: 'm.{i:int}.w -> n.{i}.w'\n")
    out = tmp_path / "out.safetensors"
    run = _run(["apply", str(spec), str(src), str(out), "--json"])
    assert run.returncode == 0, run.stderr
    assert "teardown ran" not in run.stderr  # os._exit: no finalizers
    report = json.loads(run.stdout)  # stdout flushed whole before the exit
    assert len(report["produced"]) == 50
    from safetensors.numpy import load_file

    assert np.array_equal(load_file(str(out))["n.49.w"], np.full((4, 3), 49, np.float32))


def test_the_exit_code_is_kept(tmp_path):
    run = _run(["inspect", str(tmp_path / "missing.safetensors")])
    assert run.returncode == 2 and "missing.safetensors" in run.stderr
    assert "teardown ran" not in run.stderr


def test_an_atexit_callback_gets_the_usual_exit(tmp_path):
    src = _model(tmp_path)
    setup = "import atexit; atexit.register(lambda: sys.stderr.write('atexit ran\\n'))"
    run = _run(["inspect", str(src)], setup)
    assert run.returncode == 0, run.stderr
    assert "atexit ran" in run.stderr and "teardown ran" in run.stderr
    assert run.stdout.rstrip().endswith("-> ok")


def test_a_call_from_python_returns(tmp_path):
    src = _model(tmp_path)
    code = f"from statemap.cli import main; rc = main(['inspect', {str(src)!r}]); print('returned', rc)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.rstrip().endswith("returned 0"), run.stderr


def test_a_non_daemon_thread_gets_the_usual_exit(tmp_path):
    src = _model(tmp_path)
    setup = "import time; threading.Thread(target=lambda: (time.sleep(0.5), sys.stderr.write('thread done\\n'))).start()"
    run = _run(["inspect", str(src)], setup)
    assert run.returncode == 0, run.stderr
    assert "thread done" in run.stderr and "teardown ran" in run.stderr  # waited for, as the usual exit does


def test_an_idle_daemon_thread_does_not_keep_the_teardown(tmp_path):
    src = _model(tmp_path)
    setup = "import time; threading.Thread(target=time.sleep, args=(30,), daemon=True).start()"
    run = _run(["inspect", str(src)], setup)
    assert run.returncode == 0, run.stderr
    assert "teardown ran" not in run.stderr


def test_a_profiler_gets_the_usual_exit_and_writes_its_stats(tmp_path):
    src = _model(tmp_path)
    prof = tmp_path / "p.prof"
    run = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "statemap", "inspect", str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert prof.stat().st_size > 0
