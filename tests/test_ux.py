"""Using statemap as a person would (issue 15): progress on a terminal only, whole lines when
piped, a summary line with the verdict, complete help, bad values refused with their range,
hints that name the real mistake, and no traceback without torch."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from statemap.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "deltalm-tiny.pt"
SPEC = "version: 1\nname: t\nrules:\n  - rename: 'a.{x} -> b.{x}'\n"


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli(*argv: object, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed program, piped (stdout and stderr are not terminals)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "statemap", *map(str, argv)], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture
def small(tmp_path: Path) -> Path:
    save_file({"a.w": np.ones((2, 3), "f4"), "a.b": np.ones(3, "f4")}, str(tmp_path / "in.safetensors"))
    (tmp_path / "s.yaml").write_text(SPEC)
    return tmp_path


# -- progress: determinate, on a terminal only ------------------------------------------------


def _recording_console() -> tuple[object, io.StringIO]:
    from statemap.textsafe import console

    buf = io.StringIO()
    return console(file=buf, force_terminal=True, width=160), buf


def test_write_progress_counts_tensors_and_bytes(tmp_path):
    from statemap import convert
    from statemap.progress import RichReporter, reporting

    con, buf = _recording_console()
    with reporting(RichReporter(con)):
        convert("deltalm-fairseq-to-hf", TINY, tmp_path / "o.safetensors")
    text = buf.getvalue()
    assert "393/393 tensors" in text  # dedupe: 393 stored of 395 names; the total is known up front
    assert re.search(r"(226\.\d)/\1 kB", text), text[-400:]  # bytes done / total (each tied group once)
    assert "writing o.safetensors" in text
    assert "eta" in text


def test_diff_values_progress_and_silence_without_a_reporter(tmp_path):
    from statemap.diff import diff_checkpoints
    from statemap.progress import RichReporter, reporting

    con, buf = _recording_console()
    with reporting(RichReporter(con)):
        assert diff_checkpoints(TINY, TINY, values=True).same
    assert "reading A and B" in buf.getvalue() and "790/790 tensors" in buf.getvalue()
    con, buf = _recording_console()
    diff_checkpoints(TINY, TINY, values=True)  # no reporter installed: nothing shown
    assert buf.getvalue() == ""


def test_hf_build_shows_a_labelled_spinner():
    from contextlib import contextmanager

    from statemap.errors import CheckpointError
    from statemap.load.hf_meta import hf_layout
    from statemap.progress import reporting

    labels = []

    class Rec:
        @contextmanager
        def task(self, label, tensors, nbytes):
            labels.append((label, tensors, nbytes))
            yield None

    with reporting(Rec()), pytest.raises(CheckpointError, match="needs the model's config.json"):
        hf_layout("hf:BertModel", None)
    assert labels == [("building hf:BertModel from no config (transformers)", None, None)]


def _pty_run(argv: list[str], cwd: Path) -> str:
    """Run with stderr on a pseudo-terminal (stdout piped); return what the terminal saw."""
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "150", "TERM": "xterm"}
    p = subprocess.Popen([sys.executable, "-m", "statemap", *argv], stdout=subprocess.PIPE, stderr=slave, cwd=cwd, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    p.communicate()
    os.close(master)
    return b"".join(chunks).decode(errors="replace")


def test_progress_on_a_terminal_only_and_never_with_json_or_quiet(tmp_path):
    apply = ["apply", "deltalm-fairseq-to-hf", str(TINY), str(tmp_path / "o.safetensors"), "--force"]
    assert "393/393 tensors" in _pty_run(apply, tmp_path)
    assert "tensors" not in _pty_run([*apply, "--json"], tmp_path)
    assert "tensors" not in _pty_run([*apply, "-q"], tmp_path)
    piped = cli(*apply)
    assert piped.returncode == 0 and piped.stderr == ""  # stderr not a terminal: no bar


# -- whole lines when piped ------------------------------------------------------------------


def test_list_piped_is_one_line_per_spec():
    from statemap.spec import catalog_entries as entries

    r = cli("list")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == len(entries()) + 2  # header, rule, one line per spec
    for e in entries():
        (line,) = [ln for ln in lines if ln.split("│")[0].strip() == e.name]
        assert e.description in line and e.verified in line and not line.endswith(" ")


def test_inspect_keys_and_paths_are_never_wrapped(tmp_path):
    key = "encoder." + ".".join(f"very_long_module_name_{i}" for i in range(8)) + ".weight"
    save_file({key: np.zeros((3, 5), "f4")}, str(tmp_path / "m.safetensors"))
    r = cli("inspect", tmp_path / "m.safetensors", "--keys")
    (line,) = [ln for ln in r.stdout.splitlines() if key in ln]
    assert "[3, 5] float32" in line  # grep sees the key with its shape and dtype
    deep = tmp_path / ("x" * 60) / ("y" * 60)
    deep.mkdir(parents=True)
    out = deep / "converted-with-a-long-name.safetensors"
    r = cli("apply", "deltalm-fairseq-to-hf", TINY, out)
    assert r.returncode == 0
    assert any(str(out) in ln and ln.startswith("deltalm-fairseq-to-hf: ") for ln in r.stdout.splitlines())
    assert r.stdout.splitlines()[-1] == f"apply: wrote 393 tensors for 395 names (226.6 KB) to {out} -> ok"


def test_the_pipe_width_is_what_makes_lines_whole():
    """Negative check: an 80-column console (rich's default when piped) would wrap the list."""
    from rich.console import Console

    from statemap.textsafe import PIPE_WIDTH, console

    assert console(file=io.StringIO()).width == PIPE_WIDTH
    assert Console(file=io.StringIO()).width == 80


# -- summary lines, verdicts, exit codes -------------------------------------------------------


def _last(out: str) -> str:
    return out.rstrip("\n").splitlines()[-1]


def test_every_report_ends_with_a_verdict(small, capsys):
    ref = small / "ref.safetensors"
    save_file({"b.w": np.ones((2, 3), "f4"), "b.b": np.ones(3, "f4")}, str(ref))
    cases = [
        (["apply", small / "s.yaml", small / "in.safetensors", small / "o.safetensors"], 0, "-> ok"),
        (["apply", small / "s.yaml", small / "in.safetensors", "--dry-run"], 0, "apply (dry run): would write 2 tensors -> ok"),
        (["check", small / "s.yaml", "--against", small / "in.safetensors"], 0, "-> ok"),
        (
            ["diff", small / "in.safetensors", ref],
            1,
            "2 only in A, 2 only in B, 0 shape mismatches, 0 dtype mismatches -> different",
        ),
        (["diff", ref, ref, "--values"], 0, "0 value mismatches -> same"),
        (["inspect", small / "in.safetensors"], 0, "inspect: 2 tensors, 9 parameters, 36 bytes (safetensors) -> ok"),
        (["lint", small / "s.yaml"], 0, "-> clean"),
    ]
    for argv, code, tail in cases:
        got, out, _ = run(capsys, *argv)
        assert got == code and _last(out).endswith(tail), (argv, out)


def test_expect_summary_counts_each_kind_and_dtype_only_exits_1(small, capsys):
    spec = small / "c.yaml"
    spec.write_text(SPEC.replace("'a.{x} -> b.{x}'", "a.b -> b.b") + "  - cast: {from: a.w, to: b.w, dtype: uint16}\n")
    dtype_only = small / "dtype.json"
    dtype_only.write_text(json.dumps({"b.w": {"shape": [2, 3], "dtype": "float32"}, "b.b": [3]}))
    code, out, _ = run(capsys, "apply", spec, small / "in.safetensors", "--dry-run", "--expect", dtype_only)
    assert code == 1 and _last(out) == "expect: 0 missing, 0 unexpected, 0 shape mismatches, 1 dtype mismatch -> differs"
    code, out, _ = run(capsys, "apply", spec, small / "in.safetensors", small / "o.safetensors", "--expect", dtype_only)
    assert code == 1 and (small / "o.safetensors").exists()  # written, and the mismatch is the exit code
    every = small / "every.json"
    listing = {"b.w": {"shape": [3, 2], "dtype": "float32"}, "b.b": {"shape": [3], "dtype": "float16"}}
    listing.update({"gone.0": [1], "gone.1": [1], "gone.2": [1]})
    every.write_text(json.dumps(listing))
    spec.write_text(spec.read_text() + "  - inject: {to: extra, shape: [1], dtype: float32, value: 0}\n")
    code, out, _ = run(capsys, "apply", spec, small / "in.safetensors", "--dry-run", "--expect", every)
    assert code == 1
    assert _last(out) == "expect: 3 missing, 1 unexpected, 1 shape mismatch, 2 dtype mismatches -> differs"
    listing = {"b.w": {"shape": [2, 3], "dtype": "uint16"}, "b.b": [3], "extra": [1]}
    every.write_text(json.dumps(listing))  # negative check: a matching listing is ok
    code, out, _ = run(capsys, "apply", spec, small / "in.safetensors", "--dry-run", "--expect", every)
    assert code == 0 and _last(out).endswith(f"matches {every} -> ok")


def test_sharded_output_reported_as_the_files_written(small, capsys):
    code, out, _ = run(
        capsys, "apply", small / "s.yaml", small / "in.safetensors", small / "o.safetensors", "--max-shard-size", "20"
    )
    assert code == 0 and not (small / "o.safetensors").exists()
    files = ["o-00001-of-00002.safetensors", "o-00002-of-00002.safetensors", "o.safetensors.index.json"]
    for f in files:
        assert (small / f).is_file() and f"  {small / f}" in out.splitlines()
    assert _last(out) == f"apply: wrote 2 tensors (36 bytes) to {small / 'o.safetensors.index.json'} and 2 shards -> ok"
    assert "0.0 MB" not in out


@pytest.mark.parametrize(
    "n, shown",
    [
        (0, "0 bytes"),
        (1, "1 byte"),
        (999, "999 bytes"),
        (1000, "1.0 KB"),
        (36_500, "36.5 KB"),
        (2_500_000, "2.5 MB"),
        (3 * 10**9, "3.00 GB"),
    ],
)
def test_human_sizes(n, shown):
    from statemap.report import human_size

    assert human_size(n) == shown


def test_source_tie_note_only_when_it_matters(tmp_path, capsys):
    code, out, _ = run(capsys, "apply", "deltalm-fairseq-to-hf", TINY, tmp_path / "o.safetensors")
    assert code == 0 and "tied in the source" not in out  # dedupe: "written once" lines say it
    assert "written once: model.shared.weight" in out
    code, out, _ = run(capsys, "apply", "deltalm-fairseq-to-hf", TINY, tmp_path / "c.safetensors", "--tied", "clone")
    assert code == 0 and "tied in the source" in out and "written as its own tensor" in out  # copies: worth saying
    code, out, _ = run(capsys, "apply", "deltalm-fairseq-to-hf", TINY, "--dry-run", "-v")
    assert "tied in the source" in out


# -- help and usage -----------------------------------------------------------------------------


COMMANDS = sorted(next(a for a in build_parser()._actions if a.dest == "command").choices)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_is_complete(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "examples:\n  statemap " + name in out and "exit codes: 0 " in out
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[name]
    assert sub.description
    formatter = sub._get_formatter()
    for action in sub._actions:
        assert action.help, (name, action.dest)
        if action.option_strings and action.dest != "help" and not isinstance(action, argparse._StoreTrueAction):
            assert "default" in (formatter._get_help_string(action) or ""), (
                name,
                action.dest,
            )  # a value, or what happens without it


def test_unknown_option_prints_the_subcommand_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["diff", "a", "b", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: statemap diff ") and "unrecognized arguments: --bogus" in err


BAD_VALUES = [
    (["apply", "s", "i", "o", "--max-shard-size", "0"], "apply", r"'0' is out of range: must be more than 0 bytes"),
    (["apply", "s", "i", "o", "--max-shard-size=-5GB"], "apply", r"cannot read size '-5GB'"),
    (["apply", "s", "i", "o", "--workers", "0"], "apply", r"--workers: 0 is out of range: must be 1 or more"),
    (["apply", "s", "i", "o", "--workers", "x"], "apply", r"'x' is not a whole number"),
    (["apply", "s", "i", "o", "--workers", "4"], "apply", r"--workers 4 writes shards in parallel: it needs --max-shard-size"),
    (["apply", "s", "i", "o", "--accept-loss", "k"], "apply", r"--accept-loss applies to --reverse only"),
    (["apply", "s", "i"], "apply", r"apply needs an OUTPUT \(or --dry-run\)"),
    (["diff", "a", "b", "--atol", "-1"], "diff", r"--atol: -1 is out of range: must be a finite number, 0 or more"),
    (["diff", "a", "b", "--rtol", "nan"], "diff", r"--rtol: nan is out of range"),
    (["diff", "a", "b", "--config", "c.json"], "diff", r"--config is the model config for an hf:ModelClass side"),
    (["diff", "a", "b", "--set", "v=1"], "diff", r"--set overrides vars of --spec"),
    (["check", "s", "--vars-from", "params.json"], "check", r"--vars-from reads vars for planning with --against"),
    (["inspect", "f", "--depth", "-1"], "inspect", r"--depth: -1 is out of range: must be 1 or more"),
    (["inspect", "f", "--depth", "0"], "inspect", r"--depth: 0 is out of range"),
]


@pytest.mark.parametrize("argv, command, message", BAD_VALUES)
def test_bad_values_are_refused_with_the_range(argv, command, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"usage: statemap {command} ")
    assert re.search(message, err), err


def test_config_without_an_hf_expectation(small, capsys):
    cfg = small / "config.json"
    cfg.write_text("{}")
    code, _, err = run(capsys, "apply", small / "s.yaml", small / "in.safetensors", "--dry-run", "--config", cfg)
    assert code == 2 and "a model config is used only with --expect hf:ModelClass" in err
    # the spec's own `expect: hf:...` counts: then --config is what it needs (it fails later, on the class)
    (small / "h.yaml").write_text(SPEC + "expect: hf:NoSuchModelClass\n")
    code, _, err = run(capsys, "apply", small / "h.yaml", small / "in.safetensors", "--dry-run", "--config", cfg)
    assert "used only with" not in err and "hf:NoSuchModelClass" in err  # an hf: ref is not a path beside the spec


def test_api_refuses_meaningless_values_too(small):
    from statemap import convert
    from statemap.errors import OutputError, StatemapError
    from statemap.meta import TensorMeta
    from statemap.write import write_checkpoint

    with pytest.raises(StatemapError, match=r"workers=0 is out of range"):
        convert(small / "s.yaml", small / "in.safetensors", small / "o.safetensors", workers=0)
    with pytest.raises(OutputError, match=r"shard size 0 is out of range"):
        write_checkpoint(small / "w.safetensors", [TensorMeta("w", (2,), "float32")], [np.zeros(2, "f4")], max_shard_size=0)
    assert not (small / "w.safetensors").exists()


# -- hints ------------------------------------------------------------------------------------------


def test_hints_name_the_real_mistake(small, tmp_path, capsys):
    converted = tmp_path / "hf.safetensors"
    assert run(capsys, "apply", "deltalm-fairseq-to-hf", TINY, converted)[0] == 0
    code, _, err = run(capsys, "apply", "deltalm-fairseq-to-hf", converted, "--dry-run")
    assert code == 2 and "the input looks converted already" in err and "optional: true" not in err
    code, _, err = run(capsys, "apply", "vit-timm-to-hf", TINY, "--dry-run")
    assert code == 2 and "looks like another family: catalog spec 'deltalm-fairseq-to-hf'" in err
    assert "optional: true" not in err
    # HF GPT-2 and nanoGPT share every key name: the hint names the spec whose shape checks the
    # input passes, not the other direction (it named nanogpt-to-gpt2-hf for HF GPT-2 before)
    gpt2 = Path(__file__).resolve().parent / "fixtures" / "gpt2"
    code, _, err = run(capsys, "apply", "clip-hf-to-openai", gpt2 / "hf", "--dry-run")
    assert code == 2 and "catalog spec 'gpt2-hf-to-nanogpt' covers" in err and "nanogpt-to-gpt2-hf" not in err
    code, _, err = run(capsys, "apply", "clip-hf-to-openai", gpt2 / "ckpt.pt", "--dry-run")
    assert code == 2 and "catalog spec 'nanogpt-to-gpt2-hf' covers" in err and "gpt2-hf-to-nanogpt" not in err
    code, _, err = run(capsys, "apply", TINY, small / "s.yaml", tmp_path / "o.safetensors")
    assert code == 2 and err.strip().endswith(
        "this looks like a checkpoint (torch-zip), not a spec; usage: statemap apply SPEC INPUT [OUTPUT]"
    )
    assert "utf-8" not in err
    misnamed = tmp_path / "notes.safetensors"
    misnamed.write_text("these are my training notes, not weights\n" * 5)
    code, _, err = run(capsys, "inspect", misnamed)
    assert code == 2 and "not a checkpoint: looks like a text file" in err and "header length" not in err
    shutil.copy(small / "s.yaml", tmp_path / "spec.pt")
    code, _, err = run(capsys, "inspect", tmp_path / "spec.pt")
    assert "a statemap spec? usage: statemap apply SPEC INPUT [OUTPUT]" in err
    (tmp_path / "nov.yaml").write_text(SPEC.replace("version: 1\n", ""))
    code, _, err = run(capsys, "apply", tmp_path / "nov.yaml", small / "in.safetensors", "--dry-run")
    assert code == 2 and "spec has no 'version' field; add `version: 1`" in err
    (tmp_path / "o.safetensors").write_bytes(b"")
    code, _, err = run(capsys, "apply", small / "s.yaml", small / "in.safetensors", tmp_path / "o.safetensors")
    assert code == 2 and "pass --force to replace it" in err and "force=True" not in err


def test_a_rule_that_matches_nothing_still_advises_optional_when_nothing_else_fits(small, capsys):
    """Negative check: the hints do not fire on an input of no known family."""
    (small / "z.yaml").write_text(SPEC.replace("a.{x}", "zz.{x}").replace("b.{x}", "yy.{x}"))
    code, _, err = run(capsys, "apply", small / "z.yaml", small / "in.safetensors", "--dry-run")
    assert code == 2 and "mark it 'optional: true' if that is expected" in err and "looks" not in err


# -- without torch --------------------------------------------------------------------------------


NO_TORCH = "import sys; sys.modules['torch'] = None\n"


def test_pt_output_without_torch_works(small):
    """A .pt output is torch's zip format written by statemap itself: no torch needed."""
    code = NO_TORCH + "from statemap.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run(
        [sys.executable, "-c", code, "apply", small / "s.yaml", small / "in.safetensors", small / "o.pt", "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    import statemap

    with statemap.open_checkpoint(small / "in.safetensors") as a, statemap.open_checkpoint(small / "o.pt") as b:
        assert len(a.metas) == len(b.metas)
        for (ka, ma), (kb, mb) in zip(a.metas.items(), b.metas.items()):
            assert ma.shape == mb.shape and a.read(ka).tobytes() == b.read(kb).tobytes(), (ka, kb)


def test_diff_checkpoints_of_two_pt_paths_works_without_torch(tmp_path):
    shutil.copy(TINY, tmp_path / "a.pt")
    shutil.copy(TINY, tmp_path / "b.pt")
    code = NO_TORCH + "import statemap; r = statemap.diff_checkpoints('a.pt', 'b.pt'); print(r.same, r.n_common)"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "395"]
    with pytest.raises(TypeError, match="expected a path or an opened checkpoint"):
        from statemap import diff_checkpoints

        diff_checkpoints({"w": 1}, "b.pt")  # type: ignore[arg-type]


def test_tables_on_a_narrow_terminal_fold_and_never_cut():
    from statemap.report import table
    from statemap.textsafe import console

    buf = io.StringIO()
    con = console(file=buf, force_terminal=True, width=40)
    key = "model.decoder.layers.{0-11}.self_attn.k_proj.weight"
    con.print(table("dropped (12)", ("key", "shape", "dtype", "count"), [(key, "[1024, 1024]", "float32", "x12")]))
    text = re.sub(r"\x1b\[[0-9;]*m", "", buf.getvalue())
    assert "…" not in text
    assert "".join(ln.split("│")[0].strip() for ln in text.splitlines()[3:]) == key  # folded onto lines, whole
