"""What an apply may write: every output file (each shard, the index) is checked up front against the
inputs (by inode, not by name) and existing files; outputs are locked; stale temporary files are
cleaned; resource bounds and `expect` listings are checked before a byte is written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import statemap
from statemap.cli import main
from statemap.meta import TensorMeta
from statemap.write import output_files, write_checkpoint

SPEC = "name: t\nversion: 1\nrules:\n  - keep: '{k}'\n"


def run(capsys, *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and not p.is_symlink()}


def sharded_input(d: Path) -> Path:
    """An HF-style sharded checkpoint: model-0000k-of-00002.safetensors + model.safetensors.index.json."""
    d.mkdir()
    save_file({"a": np.ones((32, 32), "f4")}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"b": np.full((32, 32), 2, "f4")}, str(d / "model-00002-of-00002.safetensors"))
    wm = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return d


def test_output_files_names_every_shard_and_the_index():
    metas = [TensorMeta(f"t{i}", (256,), "float32") for i in range(5)]  # 1 KiB each
    assert output_files("x/model.safetensors", metas) == [Path("x/model.safetensors")]
    assert output_files("x/model.safetensors", metas, "1MB") == [Path("x/model.safetensors")]
    assert [p.name for p in output_files("x/model.safetensors", metas, "2KiB")] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    assert output_files("x/model.pt", metas) == [Path("x/model.pt")]


def _collide(tmp_path: Path) -> dict[str, tuple[list[object], str]]:
    """name -> (apply arguments, message). Every case must leave every file as it was."""
    hf = sharded_input(tmp_path / "hf")
    one = tmp_path / "one.safetensors"
    save_file({"a": np.ones((32, 32), "f4"), "b": np.zeros((32, 32), "f4")}, str(one))
    os.link(one, tmp_path / "hardlink.safetensors")
    os.symlink(one, tmp_path / "symlink.safetensors")
    os.symlink(hf / "model-00002-of-00002.safetensors", tmp_path / "o-00002-of-00002.safetensors")
    (tmp_path / "taken-00002-of-00002.safetensors").write_text("precious")
    (tmp_path / "dir.safetensors").mkdir()
    other = tmp_path / "other"  # an index named like the output's index, over shards named otherwise
    other.mkdir()
    save_file({"a": np.ones((32, 32), "f4"), "b": np.zeros((32, 32), "f4")}, str(other / "part.safetensors"))
    (other / "o.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "part.safetensors", "b": "part.safetensors"}})
    )
    is_input = r"is an input; statemap never writes over its inputs \(not even with --force\)"
    return {
        # the issue's case: the output's shards and index are the input's own
        "shards over the input's shards": (
            [hf, hf / "model.safetensors", "--max-shard-size", "4KB"],
            rf"model-00001-of-00002\.safetensors: {is_input}",
        ),
        "shards over the input's shards --force": (
            [hf, hf / "model.safetensors", "--max-shard-size", "4KB", "--force"],
            rf"model-00001-of-00002\.safetensors: {is_input}",
        ),
        "index over the input's index --force": (
            [other, other / "o.safetensors", "--max-shard-size", "4KB", "--force"],
            rf"o\.safetensors\.index\.json: {is_input}",
        ),
        "single file named like an input shard --force": (
            [hf, hf / "model-00002-of-00002.safetensors", "--force"],
            rf"model-00002-of-00002\.safetensors: {is_input}",
        ),
        "the input itself --force": ([one, one, "--force"], rf"one\.safetensors: {is_input}"),
        "a hard link to the input --force": (
            [one, tmp_path / "hardlink.safetensors", "--force"],
            rf"hardlink\.safetensors: {is_input}",
        ),
        "a symlink to the input --force": (
            [one, tmp_path / "symlink.safetensors", "--force"],
            rf"symlink\.safetensors: {is_input}",
        ),
        "a shard that is a symlink to an input shard --force": (
            [hf, tmp_path / "o.safetensors", "--max-shard-size", "4KB", "--force"],
            rf"o-00002-of-00002\.safetensors: {is_input}",
        ),
        "the --expect reference --force": ([hf, one, "--expect", one, "--force"], rf"one\.safetensors: {is_input}"),
        "an existing shard without --force": (
            [one, tmp_path / "taken.safetensors", "--max-shard-size", "4KB"],
            r"taken-00002-of-00002\.safetensors: already exists; pass --force",
        ),
        "a directory --force": ([one, tmp_path / "dir.safetensors", "--force"], r"dir\.safetensors: is a directory"),
        "a missing folder": ([one, tmp_path / "nope" / "o.safetensors"], r"nope: output folder does not exist"),
    }


CASES = [
    "shards over the input's shards",
    "shards over the input's shards --force",
    "index over the input's index --force",
    "single file named like an input shard --force",
    "the input itself --force",
    "a hard link to the input --force",
    "a symlink to the input --force",
    "a shard that is a symlink to an input shard --force",
    "the --expect reference --force",
    "an existing shard without --force",
    "a directory --force",
    "a missing folder",
]


@pytest.mark.parametrize("case", CASES)
def test_outputs_never_replace_inputs_or_existing_files(tmp_path, capsys, case):
    cases = _collide(tmp_path)
    assert sorted(cases) == sorted(CASES)
    argv, message = cases[case]
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    before, names = snapshot(tmp_path), sorted(os.listdir(tmp_path))
    code, err = run(capsys, "apply", spec, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), err
    assert snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == names


def test_issue_case_then_a_rerun_to_another_folder_works(tmp_path, capsys):
    hf = sharded_input(tmp_path / "hf")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    before = snapshot(hf)
    assert run(capsys, "apply", spec, hf, hf / "model.safetensors", "--max-shard-size", "4KB")[0] == 2
    assert snapshot(hf) == before
    (tmp_path / "out").mkdir()
    assert run(capsys, "apply", spec, hf, tmp_path / "out" / "model.safetensors", "--max-shard-size", "4KB")[0] == 0
    out = {k: v for f in sorted((tmp_path / "out").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    np.testing.assert_array_equal(out["a"], np.ones((32, 32), "f4"))
    np.testing.assert_array_equal(out["b"], np.full((32, 32), 2, "f4"))
    assert snapshot(hf) == before
    # writing over that output again needs --force, for every file of the set; then it works
    code, err = run(capsys, "apply", spec, hf, tmp_path / "out" / "model.safetensors", "--max-shard-size", "4KB")
    assert code == 2 and "model-00001-of-00002.safetensors: already exists; pass --force" in err
    assert run(capsys, "apply", spec, hf, tmp_path / "out" / "model.safetensors", "--max-shard-size", "4KB", "--force")[0] == 0


def test_stale_temporary_files_are_removed_but_not_a_live_writers(tmp_path, capsys):
    import fcntl

    src = tmp_path / "in.safetensors"
    save_file({"a": np.ones(4, "f4")}, str(src))
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    out.mkdir()
    stale = [
        out / ".o.safetensors.statemap-999999999-0a1b2c3d.tmp",  # this output, its writer gone
        out / ".o.safetensors.statemap.lock",  # a lock nobody holds (a SIGKILLed writer's)
        out / ".other.pt.statemap-999999998-77.tmp",  # another output, no writer
    ]
    for p in stale:
        p.write_bytes(b"partial")
    live_tmp = out / f".busy.safetensors.statemap-{os.getpid()}-feed.tmp"
    live_tmp.write_bytes(b"being written")
    fd = os.open(out / ".busy.safetensors.statemap.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live writer of busy.safetensors
    alive = out / f".gone.safetensors.statemap-{os.getppid()}-beef.tmp"  # lock free, but its process runs: kept
    alive.write_bytes(b"?")
    keep = out / "notes.tmp"
    keep.write_text("not ours")
    try:
        assert run(capsys, "apply", spec, src, out / "o.safetensors")[0] == 0
    finally:
        os.close(fd)
    assert sorted(os.listdir(out)) == sorted(
        ["o.safetensors", live_tmp.name, ".busy.safetensors.statemap.lock", alive.name, "notes.tmp"]
    )


def test_a_second_writer_in_the_same_process_is_refused(tmp_path):
    """Locks are per open file, so two threads of one process exclude each other too."""
    out = tmp_path / "o.safetensors"
    metas = [TensorMeta(f"t{i}", (4,), "float32") for i in range(3)]
    started, go = threading.Event(), threading.Event()
    result: list[object] = []

    def slow():
        for i in range(3):
            if i == 1:
                started.set()
                go.wait(10)
            yield np.full(4, i, "f4")

    t = threading.Thread(target=lambda: result.append(write_checkpoint(out, metas, slow())))
    t.start()
    assert started.wait(10)
    with pytest.raises(
        statemap.OutputError, match=r"o\.safetensors: another statemap writer \(pid \d+\) is writing it right now"
    ):
        write_checkpoint(out, metas, (np.zeros(4, "f4") for _ in metas), force=True)
    go.set()
    t.join(10)
    assert result and sorted(os.listdir(tmp_path)) == ["o.safetensors"]
    np.testing.assert_array_equal(load_file(str(out))["t2"], np.full(4, 2, "f4"))  # the first writer's


# -- bounds and checks before anything is written ---------------------------------------------------


def _inject(tmp_path: Path, shape: str) -> tuple[Path, Path]:
    src = tmp_path / "in.safetensors"
    save_file({"a": np.ones(4, "f4")}, str(src))
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: t\nversion: 1\nrules:\n  - keep: a\n  - inject: {{to: c, shape: {shape}, value: 1}}\n")
    return src, spec


@pytest.mark.parametrize(
    "shape, out, message",
    [
        (
            "[100000000000000]",
            "o.safetensors",
            r"o\.safetensors: the output needs 400\.0 TB but only .* is free in .*; nothing was written",
        ),
        (
            "[100000000000000000000]",
            "o.safetensors",
            r"spec\.yaml:5: rule #2 \(inject -\): injected shape .* is too large",
        ),  # planner
        ("[1000, 1000, 1000, 1000, 1000, 1000]", "o.pt", r"o\.pt: the output needs 4000\.0 PB"),
        ("[100000000000000]", "o.msgpack", r"o\.msgpack: the output needs 400\.0 TB"),
    ],
)
def test_huge_inject_refused_before_allocation(tmp_path, capsys, shape, out, message):
    src, spec = _inject(tmp_path, shape)
    code, err = run(capsys, "apply", spec, src, tmp_path / out)
    assert code == 2 and re.search(message, err), err
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors", "spec.yaml"]


def test_memory_bound_is_checked_before_allocation(tmp_path, capsys, monkeypatch):
    import statemap.write as w

    src, spec = _inject(tmp_path, "[1000000]")  # 4 MB
    monkeypatch.setattr(w, "memory_budget", lambda: 1 << 20)
    code, err = run(capsys, "apply", spec, src, tmp_path / "o.safetensors")
    assert code == 2 and "tensor 'c' [1000000] would take 4.0 MB in memory, more than the 1.0 MB" in err, err
    for out in ("o.pt", "o.msgpack"):  # streamed too: the one computed tensor is what must fit
        code, err = run(capsys, "apply", spec, src, tmp_path / out)
        assert code == 2 and f"{out}: tensor 'c' [1000000] would take 4.0 MB in memory, more than the 1.0 MB" in err, err
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors", "spec.yaml"]
    monkeypatch.setattr(w, "memory_budget", lambda: 1 << 30)  # the same spec fits a bigger budget
    assert run(capsys, "apply", spec, src, tmp_path / "o.safetensors")[0] == 0
    np.testing.assert_array_equal(load_file(str(tmp_path / "o.safetensors"))["c"], np.ones(1000000, "f4"))


def test_memory_bound_honours_an_address_space_limit(tmp_path):
    """In a child limited to 2 GB of address space, a 4 GB inject is refused up front (not a MemoryError)."""
    src, spec = _inject(tmp_path, "[1000000000]")
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
        "from statemap.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, "apply", str(spec), str(src), str(tmp_path / "o.safetensors")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert re.fullmatch(
        r"statemap: error: .*o\.safetensors: tensor 'c' \[1000000000\] would take 4\.0 GB in memory, more than the 2\.1 GB this process may use; check the spec's shapes\n",
        r.stderr,
    ), r.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors", "spec.yaml"]


def test_no_free_space_refused_before_writing(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.safetensors"
    save_file({"a": np.ones(1024, "f4")}, str(src))
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    real = os.statvfs

    class Full:
        def __init__(self, st):
            self.f_frsize, self.f_bavail = st.f_frsize, 1000 // st.f_frsize

    monkeypatch.setattr(os, "statvfs", lambda p: Full(real(p)))
    code, err = run(capsys, "apply", spec, src, tmp_path / "o.safetensors")
    assert code == 2 and re.search(r"o\.safetensors: the output needs 4\.1 KB but only \d+ B is free", err), err
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors", "spec.yaml"]


@pytest.mark.parametrize(
    "listing, message",
    [
        ({"a": {"shape": 5}}, r"entry 'a': shape must be a list of at most 64 non-negative integers, got 5"),
        ({"a": [[1], 2]}, r"entry 'a': shape must be .* got \[\[1\], 2\]"),
        ({"a": [-1]}, r"entry 'a': shape must be .* got \[-1\]"),
        ({"a": [1.5]}, r"entry 'a': shape must be .* got \[1\.5\]"),
        ({"a": [True]}, r"entry 'a': shape must be .* got \[True\]"),
        ({"a": ["4"]}, r"entry 'a': shape must be .* got \['4'\]"),
        ({"a": {"shape": "ab"}}, r"entry 'a': shape must be .* got 'ab'"),
        ({"a": [1] * 65}, r"entry 'a': shape must be a list of at most 64"),
        ({"a": [2**70]}, r"entry 'a': shape must be .* got \[1180591620717411303424\]"),
        ({"a": {"shape": [4], "dtype": "bogus"}}, r"entry 'a': unknown dtype 'bogus'"),
        ({"a": {"shape": [4], "dtype": 7}}, r"entry 'a': dtype must be a name like float32, got 7"),
        ({"a": [4], "b": [None]}, r"entry 'b': shape must be .* got \[None\]"),
        ({"a": "x"}, r"entry 'a' must be a shape \(a list of non-negative integers\) or \{shape, dtype\}, got 'x'"),
    ],
)
def test_bad_expect_listing_fails_before_anything_is_written(tmp_path, capsys, listing, message):
    src = tmp_path / "in.safetensors"
    save_file({"a": np.ones(4, "f4")}, str(src))
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(listing))
    code, err = run(capsys, "apply", spec, src, tmp_path / "o.safetensors", "--expect", ref)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.search(rf"ref\.json: {message}", lines[0]), err
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors", "ref.json", "spec.yaml"]


def test_good_expect_listing_still_compares(tmp_path, capsys):
    """The checks above do not refuse a valid listing: a match exits 0, a mismatch 1 (written, as documented)."""
    src = tmp_path / "in.safetensors"
    save_file({"a": np.ones(4, "f4")}, str(src))
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    ref = tmp_path / "ref.yaml"
    ref.write_text("a: {shape: [4], dtype: fp32}\n")
    assert run(capsys, "apply", spec, src, tmp_path / "o.safetensors", "--expect", ref)[0] == 0
    ref.write_text("a: [5]\n")
    assert run(capsys, "apply", spec, src, tmp_path / "p.safetensors", "--expect", ref)[0] == 1


def test_generated_text_is_written_whole_beside_no_fixed_temp_name(tmp_path, monkeypatch):
    """`invert -o` / `suggest -o`: a unique temporary name, no replacement without force, no leftovers."""
    from statemap.errors import StatemapError
    from statemap.fsutil import write_text_new

    out = tmp_path / "draft.yaml"
    (tmp_path / ".draft.yaml.statemap.tmp").write_text("another run's temp")  # the old fixed name
    write_text_new(out, "version: 1\n")
    assert out.read_text() == "version: 1\n"
    assert (tmp_path / ".draft.yaml.statemap.tmp").read_text() == "another run's temp"
    with pytest.raises(StatemapError, match=r"draft\.yaml: already exists; pass --force"):
        write_text_new(out, "other\n")
    write_text_new(out, "new\n", force=True)
    assert out.read_text() == "new\n"

    # the target appears between the check and the final step: it is not replaced
    real_link = os.link

    def racing_link(src, dst):
        Path(dst).write_text("written meanwhile")
        return real_link(src, dst)

    late = tmp_path / "late.yaml"
    monkeypatch.setattr(os, "link", racing_link)
    with pytest.raises(StatemapError, match="already exists"):
        write_text_new(late, "mine\n")
    assert late.read_text() == "written meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".draft.yaml.statemap.tmp", "draft.yaml", "late.yaml"]


# -- an earlier output at the same name, written sharded or not ------------------------------------------


def _sd(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layers.{i}.w": rng.random((64, 64), dtype=np.float32) for i in range(6)}  # 16 KB each, 96 KB


def _write(out: Path, sd: dict[str, np.ndarray], shard: str | None, force: bool = False):
    metas = [TensorMeta(k, v.shape, "float32") for k, v in sd.items()]
    return write_checkpoint(out, metas, iter(sd.values()), max_shard_size=shard, force=force, fsync=False)


@pytest.mark.parametrize(
    ("before", "after", "message"),
    [
        (None, "40KB", r"earlier output of this name \(model\.safetensors\).*--force"),  # old single file, new shards
        ("40KB", None, r"earlier output of this name \(model-00001-of-00003\.safetensors, .*index\.json\)"),
        ("20KB", "40KB", r"model\.safetensors\.index\.json: already exists"),  # the index itself is replaced
    ],
)
def test_an_earlier_output_at_the_same_name_is_refused_then_replaced_whole_with_force(tmp_path, before, after, message):
    """Left beside a new output, an earlier one would be taken for it: transformers loads
    model.safetensors before an index; glob loaders take every shard. Refused; --force removes it."""
    out = tmp_path / "model.safetensors"
    (tmp_path / "other-00001-of-00002.safetensors").write_bytes(b"not ours")  # another stem: never touched
    _write(out, _sd(1), before)
    first = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(statemap.StatemapError, match=message):
        _write(out, _sd(2), after)
    assert sorted(p.name for p in tmp_path.iterdir()) == first  # nothing written, nothing removed
    written = _write(out, _sd(2), after, force=True)
    now = sorted(p.name for p in tmp_path.iterdir())
    assert now == sorted([Path(f).name for f in written.files] + ["other-00001-of-00002.safetensors"])
    assert written.removed and all(not Path(f).exists() for f in written.removed)
    got = statemap.load_state_dict(tmp_path if after else out)
    assert all(np.array_equal(got[k], v) for k, v in _sd(2).items())


def test_force_never_removes_an_input_of_the_same_name(tmp_path):
    _write(tmp_path / "model.safetensors", _sd(1), "40KB")  # a sharded input in the folder
    spec = {"name": "t", "version": 1, "rules": [{"rename": "layers.{i}.w -> h.{i}.w"}]}
    index = tmp_path / "model.safetensors.index.json"
    with pytest.raises(statemap.StatemapError, match=r"model\.safetensors: .*is an input .*name another output"):
        statemap.convert(spec, index, tmp_path / "model.safetensors", force=True)
    assert index.exists() and len(list(tmp_path.glob("model-*.safetensors"))) == 3


def test_cli_reports_what_force_removed(tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    save_file(_sd(3), str(src))
    out = tmp_path / "out"
    out.mkdir()
    spec = tmp_path / "s.yaml"
    spec.write_text("name: t\nversion: 1\nrules:\n  - rename: 'layers.{i}.w -> h.{i}.w'\n")
    assert main(["apply", str(spec), str(src), str(out / "model.safetensors"), "--max-shard-size", "40KB", "--no-fsync"]) == 0
    capsys.readouterr()
    assert main(["apply", str(spec), str(src), str(out / "model.safetensors"), "--no-fsync"]) == 2
    assert "earlier output of this name" in capsys.readouterr().err
    assert main(["apply", str(spec), str(src), str(out / "model.safetensors"), "--no-fsync", "--force"]) == 0
    text = capsys.readouterr().out
    assert "removed 4 file(s) of the earlier output" in text and "model-00003-of-00003.safetensors" in text
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert main(["apply", str(spec), str(src), str(out / "model.safetensors"), "--no-fsync", "--force", "--json"]) == 0
    assert "removed" not in json.loads(capsys.readouterr().out)  # nothing removed this time: the key is left out
