"""Faults while writing: signals, disk full, a second writer. Each run is a child `statemap apply`
process (through the CLI), stopped mid-write; afterwards no partial or temporary file is left
(after SIGKILL: until the next run, which removes them), the inputs are byte-identical, and a
rerun writes the right tensors.

"Mid-write" is made deterministic by the child script below: it wraps ``statemap.apply.produce``
so that, before output tensor ``layer.4.w`` is produced (``layer.0..3.w`` are in the temporary
file already), it prints ``HALFWAY`` and waits (in the parent process, or in a ``--workers``
process). No hook exists in the package.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from statemap.cli import main

CHILD = """
import os, sys, time
import statemap.api
import statemap.apply

_real = statemap.apply.produce


def _paused(out, *args, **kwargs):
    if out.name == os.environ.get("STATEMAP_TEST_PAUSE_AT"):
        print("HALFWAY", flush=True)
        if os.environ.get("STATEMAP_TEST_RESUME") == "stdin":
            sys.stdin.readline()
        else:
            time.sleep(60)
    return _real(out, *args, **kwargs)


# before the output tensor named STATEMAP_TEST_PAUSE_AT is produced (the ones before it are in the
# temporary file already), in the parent and in --workers processes (spawn imports this file as __mp_main__)
statemap.apply.produce = statemap.api.produce = _paused

if __name__ == "__main__":
    import resource

    if os.environ.get("STATEMAP_TEST_FSIZE"):
        n = int(os.environ["STATEMAP_TEST_FSIZE"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
    from statemap.cli import main

    sys.exit(main(sys.argv[1:]))
"""

N = 8  # tensors t0..t7, 16x16 float32 (1 KiB each); --max-shard-size 3KiB gives 3 shards
SHARDED = ["--max-shard-size", "3KiB"]
MODES = {"single": [], "sharded": SHARDED, "workers": [*SHARDED, "--workers", "2"]}


def _setup(tmp_path: Path) -> tuple[Path, Path, Path, dict[str, bytes]]:
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = src_dir / "model.safetensors"
    save_file({f"t{i}": np.full((16, 16), i, "f4") for i in range(N)}, str(src))
    spec = src_dir / "spec.yaml"
    spec.write_text("name: t\nversion: 1\nrules:\n  - rename: 't{i} -> layer.{i}.w'\n")
    (tmp_path / "child.py").write_text(CHILD)
    return src, spec, out_dir, _snapshot(src_dir)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _start(tmp_path: Path, *argv: object, env: dict[str, str] | None = None, stdin: bool = False) -> subprocess.Popen:
    log = open(tmp_path / f"log-{time.monotonic_ns()}.txt", "w+")
    p = subprocess.Popen(
        [sys.executable, str(tmp_path / "child.py"), *map(str, argv)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        env={**os.environ, "STATEMAP_TEST_PAUSE_AT": "layer.4.w", **(env or {})},
        start_new_session=True,  # its own process group: Ctrl-C / hangup reach it and its workers only
        text=True,
    )
    p.log = log  # type: ignore[attr-defined]
    return p


def _output(p: subprocess.Popen) -> str:
    p.log.seek(0)  # type: ignore[attr-defined]
    return p.log.read()  # type: ignore[attr-defined]


def _wait_for(p: subprocess.Popen, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in _output(p):
        assert p.poll() is None, f"child ended early ({p.returncode}): {_output(p)}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout}s: {_output(p)}"
        time.sleep(0.02)


def _stop_group(p: subprocess.Popen) -> None:
    """Kill whatever is left of the child's process group (orphaned workers after SIGKILL)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=10)
    p.log.close()  # type: ignore[attr-defined]


def _group_running(pgid: int) -> list[int]:
    """Processes of a process group that still run (zombies waiting for a reaper do not count)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".statemap" in p.name)


def _check_output(out_dir: Path, sharded: bool) -> None:
    files = sorted(p.name for p in out_dir.iterdir())
    if sharded:
        assert files == [*(f"o-{k:05d}-of-00003.safetensors" for k in (1, 2, 3)), "o.safetensors.index.json"], files
        got = {k: v for f in files if f.endswith(".safetensors") for k, v in load_file(str(out_dir / f)).items()}
    else:
        assert files == ["o.safetensors"], files
        got = load_file(str(out_dir / "o.safetensors"))
    assert sorted(got) == sorted(f"layer.{i}.w" for i in range(N))
    for i in range(N):
        np.testing.assert_array_equal(got[f"layer.{i}.w"], np.full((16, 16), i, "f4"))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT", "SIGKILL"])
def test_signal_mid_write_leaves_nothing_and_a_rerun_works(tmp_path, capsys, mode, sig):
    src, spec, out_dir, before = _setup(tmp_path)
    out = out_dir / "o.safetensors"
    p = _start(tmp_path, "apply", spec, src, out, *MODES[mode])
    try:
        _wait_for(p, "HALFWAY")
        assert any(".tmp" in name for name in _leftovers(out_dir))  # mid-write: a temporary file exists
        if sig in ("SIGINT", "SIGHUP"):  # Ctrl-C / a closed terminal reach the whole process group
            os.killpg(p.pid, getattr(signal, sig))
        else:  # kill PID
            p.send_signal(getattr(signal, sig))
        code = p.wait(timeout=20)
        if sig == "SIGKILL" and mode == "workers" and Path("/proc/self/stat").exists():
            deadline = time.monotonic() + 10  # orphaned workers notice their parent is gone and exit
            while _group_running(p.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _group_running(p.pid) == []
        log = _output(p)
    finally:
        _stop_group(p)
    assert "Traceback" not in log, log
    if sig == "SIGKILL":
        assert code == -signal.SIGKILL
        assert _leftovers(out_dir), "a killed writer leaves its temporary files (the rerun removes them)"
    else:
        assert code == (130 if sig == "SIGINT" else 2), log
        last = log.strip().splitlines()[-1]
        assert last.startswith("statemap: "), log
        assert (
            "interrupted; no partial output left" in last
            if sig == "SIGINT"
            else f"interrupted by {sig}; partial output removed" in last
        )
        assert sorted(os.listdir(out_dir)) == [], os.listdir(out_dir)
    assert _snapshot(src.parent) == before
    # the rerun works, and removes what a killed writer left
    assert main(["apply", str(spec), str(src), str(out), *MODES[mode], "-q"]) == 0, capsys.readouterr()
    _check_output(out_dir, sharded=mode != "single")
    assert _snapshot(src.parent) == before


FORMATS = {
    "single": ("o.safetensors", []),
    "sharded": ("o.safetensors", ["--max-shard-size", "40KB"]),
    "workers": ("o.safetensors", ["--max-shard-size", "40KB", "--workers", "2"]),
    "pt": ("o.pt", []),
    "msgpack": ("o.msgpack", []),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_disk_full_every_format_clean_error_nothing_left(tmp_path, capsys, fmt):
    """A file-size limit (EFBIG) in the child: the last shard / the file cannot be written whole."""
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = src_dir / "model.safetensors"
    tensors = {f"t{i}": np.full((64, 64), i, "f4") for i in range(4)}  # 16 KiB each
    tensors["t4"] = np.arange(128 * 256, dtype="f4").reshape(128, 256)  # 128 KiB: over the limit alone
    save_file(tensors, str(src))
    spec = src_dir / "spec.yaml"
    spec.write_text("name: t\nversion: 1\nrules:\n  - rename: 't{i} -> layer.{i}.w'\n")
    (tmp_path / "child.py").write_text(CHILD)
    before = _snapshot(src_dir)
    name, extra = FORMATS[fmt]
    p = _start(
        tmp_path,
        "apply",
        spec,
        src,
        out_dir / name,
        *extra,
        env={"STATEMAP_TEST_FSIZE": str(96 << 10), "STATEMAP_TEST_PAUSE_AT": ""},
    )
    try:
        code = p.wait(timeout=60)
        log = _output(p)
    finally:
        _stop_group(p)
    assert code == 2, log
    assert "Traceback" not in log, log
    assert re.fullmatch(
        rf"statemap: error: .*{re.escape(name)}: write failed: File too large; no output left behind", log.strip()
    ), log
    assert sorted(os.listdir(out_dir)) == []
    assert _snapshot(src_dir) == before
    assert main(["apply", str(spec), str(src), str(out_dir / name), *extra, "-q"]) == 0, capsys.readouterr()
    assert _leftovers(out_dir) == []
    from statemap.load import open_checkpoint

    with open_checkpoint(out_dir / (name if not extra else "o.safetensors.index.json")) as ck:  # the rerun's numbers
        assert sorted(ck.metas) == sorted(f"layer.{i}.w" for i in range(5))
        for i in range(5):
            np.testing.assert_array_equal(ck.read(f"layer.{i}.w"), tensors[f"t{i}"])


@pytest.mark.parametrize("mode", ["single", "sharded"])
@pytest.mark.parametrize("force", [False, True])
def test_two_concurrent_writers_second_fails_first_intact(tmp_path, capsys, mode, force):
    src, spec, out_dir, before = _setup(tmp_path)
    out = out_dir / "o.safetensors"
    first = _start(tmp_path, "apply", spec, src, out, *MODES[mode], env={"STATEMAP_TEST_RESUME": "stdin"}, stdin=True)
    try:
        _wait_for(first, "HALFWAY")
        code = main(["apply", str(spec), str(src), str(out), *MODES[mode], *(["--force"] if force else [])])
        err = capsys.readouterr().err
        assert code == 2, err
        assert re.search(r"statemap: error: .*o[-0-9of]*\.safetensors: another statemap writer \(pid \d+\) is writing it", err), (
            err
        )
        assert first.stdin is not None
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait(timeout=20) == 0, _output(first)
    finally:
        _stop_group(first)
    _check_output(out_dir, sharded=mode == "sharded")
    assert _snapshot(src.parent) == before


def test_a_file_that_appears_while_writing_is_not_replaced(tmp_path):
    """Publication links the finished file into place: a name taken meanwhile (by anyone) stays as it is."""
    src, spec, out_dir, before = _setup(tmp_path)
    out = out_dir / "o.safetensors"
    p = _start(tmp_path, "apply", spec, src, out, env={"STATEMAP_TEST_RESUME": "stdin"}, stdin=True)
    try:
        _wait_for(p, "HALFWAY")
        out.write_text("someone else's file")
        assert p.stdin is not None
        p.stdin.write("\n")
        p.stdin.flush()
        code = p.wait(timeout=20)
        log = _output(p)
    finally:
        _stop_group(p)
    assert code == 2, log
    assert "o.safetensors: appeared while statemap was writing; not replaced" in log, log
    assert out.read_text() == "someone else's file"
    assert sorted(os.listdir(out_dir)) == ["o.safetensors"]
    assert _snapshot(src.parent) == before
