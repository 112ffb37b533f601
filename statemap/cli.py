"""The ``statemap`` command. Exit codes: 0 ok / no difference, 1 difference, 2 error."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .errors import StatemapError

EXIT_OK, EXIT_DIFF, EXIT_ERROR = 0, 1, 2


def _console(args: argparse.Namespace) -> Any:
    from .textsafe import console

    return console(quiet=getattr(args, "quiet", False))


def _progress(args: argparse.Namespace) -> Any:
    """Progress bars on stderr, only on a terminal and never with --json or -q (see statemap.progress)."""
    from .progress import RichReporter, reporting

    if getattr(args, "json", False) or getattr(args, "quiet", False) or not sys.stderr.isatty():
        return reporting(None)
    from .textsafe import console

    return reporting(RichReporter(console(stderr=True)))


def _vars(pairs: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs or ():
        if "=" not in p:
            raise StatemapError(f"--set {p!r}: write NAME=VALUE")
        k, v = p.split("=", 1)
        out[k.strip()] = v
    return out


def _write_text(path: str, text: str, force: bool) -> None:
    """Write a generated spec: never over an existing file without --force, never half-written."""
    from .fsutil import write_text_new

    write_text_new(path, text, force)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _not_swapped(spec: str) -> None:
    """A checkpoint given where the spec goes: say so, with the usage, instead of a YAML error."""
    from pathlib import Path

    from .load.formats import detect

    p = Path(spec)
    if not p.is_file():
        return
    try:
        fmt = detect(p)
    except (StatemapError, OSError):
        return
    if fmt is not None and fmt.name != "index-json":  # a JSON spec is JSON too
        raise StatemapError(
            f"{spec}: this looks like a checkpoint ({fmt.name}), not a spec; usage: statemap apply SPEC INPUT [OUTPUT]"
        )


def cmd_apply(args: argparse.Namespace) -> int:
    from .api import convert
    from .load.hf_meta import is_hf_target

    options = dict(
        vars=_vars(args.set),
        expect=args.expect,
        dry_run=args.dry_run,
        force=args.force,
        max_shard_size=args.max_shard_size,
        tied=args.tied,
        fsync=not args.no_fsync,
        reverse=args.reverse,
        accept_loss=args.accept_loss or (),
        config=args.config,
        workers=args.workers,
        vars_from=args.vars_from,
        source_sha256=args.source_sha256,
    )
    _not_swapped(args.spec)
    if args.config and not is_hf_target(args.expect):  # the spec's own `expect:` may be the hf: one
        from .spec import load_spec

        if not is_hf_target(args.expect or load_spec(args.spec, options["vars"]).expect):
            raise StatemapError(
                f"--config {args.config}: a model config is used only with --expect hf:ModelClass; leave --config out"
            )
    report = convert(args.spec, args.input, args.output, **options)
    if args.json:
        _print_json(report.to_json())
    elif not args.quiet:  # -q prints nothing but errors: no console, no rich import
        from .report import render

        render(report, _console(args), verbose=args.verbose)
    return EXIT_OK if report.ok else EXIT_DIFF


def _same_file(args: argparse.Namespace, spec: Any) -> bool:
    """`diff X X`: one path given twice is opened once (the metadata is the same checkpoint's)."""
    from .load.hf_meta import is_hf_target
    from .source import is_pattern

    return args.a == args.b and spec is None and not args.values and not is_pattern(args.a) and not is_hf_target(args.a)


def cmd_diff(args: argparse.Namespace) -> int:
    from .diff import diff_checkpoints, render_diff
    from .load import open_checkpoint
    from .load.hf_meta import hf_layout, is_hf_target

    unwrap = tuple(args.unwrap.split("/")) if args.unwrap else None
    if is_hf_target(args.a) or is_hf_target(args.b):
        if args.values or args.spec:
            opt = "--values" if args.values else "--spec"
            raise StatemapError(f"{opt} needs tensor values; an hf:ModelClass layout has none")

    from .source import is_pattern, open_input

    if args.values or args.spec:  # before numpy is imported: the hashing threads are statemap's own
        from .process import one_blas_thread

        one_blas_thread()
    spec: Any = None
    if args.spec:  # A is read as SPEC reads it: several files for a spec with `inputs:`, its vars from its config
        from .spec import load_spec

        spec = load_spec(args.spec, _vars(args.set))

    def open_file(ref: str, side_a: bool) -> Any:
        if side_a and spec is not None and spec.inputs is not None:
            return open_input(ref, spec.inputs, unwrap if unwrap is not None else spec.unwrap, spec.strip_prefix)
        return open_input(ref, None, unwrap) if is_pattern(ref) else open_checkpoint(ref, unwrap)

    def opener(ref: str, other: str, side_a: bool = False) -> Any:
        if not is_hf_target(ref):
            return open_file(ref, side_a)
        if is_hf_target(other):
            return hf_layout(ref, args.config)
        with open_file(other, not side_a) as o:  # transformers 5: the class's layout o's keys are closest to
            return hf_layout(ref, args.config, closest_to=list(o.metas))

    with opener(args.a, args.b, True) as a, a if _same_file(args, spec) else opener(args.b, args.a) as b:
        rule_of = None
        if spec is not None:  # compare B with what SPEC makes of A, computed in memory, never written
            from .correspond import planned_checkpoint
            from .source import bind_vars, config_base

            spec = bind_vars(spec, a, config_base(args.a))
            a, rule_of = planned_checkpoint(spec, a, like=b.metas)
        r = diff_checkpoints(a, b, values=args.values or bool(args.spec), atol=args.atol, rtol=args.rtol, rule_of=rule_of)
    if args.json:
        _print_json(r.to_json())
    else:
        render_diff(r, _console(args))
    return EXIT_OK if r.same else EXIT_DIFF


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import module_rows, render_inspect, totals
    from .load import open_checkpoint
    from .report import fold, human_size
    from .source import is_pattern, open_input

    unwrap = tuple(args.unwrap.split("/")) if args.unwrap else None
    opened = open_input(args.file, None, unwrap) if is_pattern(args.file) else open_checkpoint(args.file, unwrap)
    with opened as ck:
        rows = module_rows(ck, args.depth)
        if args.json:
            _print_json(
                {
                    "path": ck.path,
                    "format": ck.format,
                    "container": ck.container,
                    "alternatives": ck.alternatives,
                    "stripped_prefix": ck.stripped_prefix,
                    "n_tensors": len(ck.metas),
                    "n_params": totals(ck)[0],
                    "modules": [r.to_json() for r in rows],
                    "tensors": [{"name": m.name, "shape": list(m.shape), "dtype": m.dtype} for m in ck.metas.values()],
                    "metadata": ck.metadata,
                    "extras": ck.extras,
                    "inputs": [
                        {"file": f.name, "captures": dict(f.captures), "format": f.format, "n_tensors": f.n_tensors}
                        for f in ck.inputs
                    ],
                }
            )
            return EXIT_OK
        con = _console(args)
        render_inspect(ck, rows, con)
        if args.keys:
            for r in fold((m.name, m) for m in ck.metas.values()):
                con.print(f"  {r}")
        n_params, n_bytes = totals(ck)
        con.print(f"inspect: {len(ck.metas)} tensors, {n_params:,} parameters, {human_size(n_bytes)} ({ck.format}) -> ok")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from .spec import catalog_entries as entries

    items = entries()
    if args.json:
        _print_json([vars(e) for e in items])
        return EXIT_OK
    from rich.table import Table
    from rich.text import Text

    from .textsafe import show, styled

    con = _console(args)
    t = Table(show_edge=False, show_lines=False)
    if con.is_terminal:  # fit the screen: the description under the name, source over target
        for c in ("name", "source -> target", "verified"):
            t.add_column(c, overflow="fold")
        for e in items:
            name = styled((e.name, "bold"))
            name.append("\n")
            name.append(show(e.description))
            t.add_row(name, Text(f"{show(e.source)}\n-> {show(e.target)}"), e.verified)
    else:  # piped: one line per spec, so `statemap list | grep bart` shows whole entries
        for c in ("name", "description", "source", "target", "verified"):
            t.add_column(c, no_wrap=True)
        for e in items:
            t.add_row(e.name, show(e.description), show(e.source), show(e.target), show(e.verified))
    con.print(t)
    return EXIT_OK


def cmd_invert(args: argparse.Namespace) -> int:
    from .api import check_losses
    from .invert import invert
    from .spec import load_spec

    spec = load_spec(args.spec, _vars(args.set))
    inv = invert(spec)
    text = inv.to_yaml()
    complete = True
    try:
        check_losses(spec, inv.lost, args.accept_loss or ())
    except StatemapError:
        if args.output:  # never write an incomplete reverse unless its losses are accepted by name
            raise
        complete = False
    if args.output:
        _write_text(args.output, text, args.force)
    if args.json:
        _print_json(
            {
                "spec": inv.spec.name,
                "lossless": inv.lossless,
                "usable": inv.usable,
                "not_restored": list(inv.lost),
                "ambiguous": list(inv.ambiguous),
                "rules": len(inv.spec.rules),
                "output": args.output,
            }
        )
    elif not args.output:
        sys.stdout.write(text)
    else:
        con = _console(args)
        from .textsafe import styled

        con.print(f"wrote {args.output}: {inv.spec.name!r}, {len(inv.spec.rules)} rules")
        for line in inv.lost:
            con.print(styled(("not restored:", "yellow"), f" {line}"))
        for line in inv.ambiguous:
            con.print(styled(("ambiguous:", "red"), f" {line}"))
    return EXIT_OK if inv.usable and complete else EXIT_DIFF


def cmd_lint(args: argparse.Namespace) -> int:
    import dataclasses

    from .lint import exit_code, lint_file

    findings = lint_file(args.spec, args.against, _vars(args.set))
    if args.json:
        _print_json({"findings": [dataclasses.asdict(f) for f in findings], "exit": exit_code(findings)})
        return exit_code(findings)
    shown = [f for f in findings if not (args.quiet and f.severity == "info")]
    from .textsafe import show

    for f in shown:
        sys.stdout.write(f"{show(str(f), None)}\n")
    if not args.quiet:
        worst = exit_code(findings)
        by = {sev: sum(1 for f in findings if f.severity == sev) for sev in ("error", "warning", "info")}
        verdict = {0: "clean", 1: "warnings"}.get(worst, "errors")
        sys.stdout.write(
            f"lint: {len(findings)} finding(s): {by['error']} error(s), {by['warning']} warning(s), {by['info']} info -> {verdict}\n"
        )
    return exit_code(findings)


def cmd_suggest(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .suggest import suggest_files

    name = Path(args.output).stem if args.output else "suggested"
    if args.values:
        return _suggest_values(args, name)
    s = suggest_files(args.source, args.target)
    accept: bool | list[str] = False if args.accept is None else (args.accept or True)
    text = s.to_yaml(name=name, accept=accept)
    held = [r for r in s.rules if not r.accepted_by(accept)]
    if args.output:
        _write_text(args.output, text, args.force)
    if args.json:
        _print_json(
            {
                "rules": len(s.rules),
                "unmapped_sources": list(s.unmapped_sources),
                "unmapped_targets": list(s.unmapped_targets),
                "output": args.output,
                "verify": [
                    {"sources": list(r.sources), "targets": list(r.targets), "why": r.verify, "accepted": r not in held}
                    for r in s.to_verify
                ],
            }
        )
    elif not args.output:
        sys.stdout.write(text)
    if not args.quiet and not args.json:
        sys.stderr.write(
            f"statemap: {len(s.rules)} rules drafted; {len(s.unmapped_sources)} source and {len(s.unmapped_targets)} target "
            "key kinds not mapped (listed as comments). Review it, then `statemap lint` and `statemap check --against`.\n"
        )
        if held:
            sys.stderr.write(
                f"statemap: {len(held)} rule(s) marked VERIFY (names and shapes do not decide them) are commented out; "
                "check them, then uncomment or rerun with --accept [PATTERN].\n"
            )
    return EXIT_OK


def _suggest_values(args: argparse.Namespace, name: str) -> int:
    from .load import open_checkpoint
    from .suggest_values import suggest_from_values

    with open_checkpoint(args.source) as a, open_checkpoint(args.target) as b:
        s = suggest_from_values(a, b)
    text = s.to_yaml(name=name)
    if args.output:
        _write_text(args.output, text, args.force)
    if args.json:
        _print_json(
            {
                "rules": len(s.rules),
                "unmapped_sources": s.unmapped_sources,
                "unmapped_targets": s.not_drafted,
                "output": args.output,
                "verified": s.verified,
                "from_values": s.from_values,
                "from_names": s.from_names,
                "problems": s.problems,
            }
        )
    elif not args.output:
        sys.stdout.write(text)
    if not args.quiet and not args.json:
        how = "reproduces the target bitwise" if s.verified else f"does NOT reproduce the target ({len(s.problems)} problem(s))"
        sys.stderr.write(
            f"statemap: {len(s.rules)} rules drafted ({s.from_values} from values, {s.from_names} from names and shapes); "
            f"the draft {how}.\n"
        )
    return EXIT_OK if s.verified else EXIT_DIFF


def cmd_check(args: argparse.Namespace) -> int:
    from .spec import load_spec

    spec = load_spec(args.spec, _vars(args.set))
    result: dict[str, Any] = {"spec": spec.name, "path": spec.path, "rules": len(spec.rules), "ok": True}
    if args.against:
        from .api import _report, plan_for
        from .source import open_source

        ck, spec = open_source(spec, args.against, args.vars_from)
        with ck:
            report = _report(spec, ck, plan_for(spec, ck), None)
        result["outputs"] = len(report.produced)
        result["passthrough"] = report.passthrough
        result["unmatched_rules"] = report.unmatched_rules
    if args.json:
        _print_json(result)
    else:
        from .textsafe import styled

        con = _console(args)
        con.print(styled(("ok", "green"), f" {spec.path}: {spec.name!r}, {len(spec.rules)} rules"))
        if args.against:
            con.print(f"plans {result['outputs']} output tensors from {args.against}")
            for r in result["unmatched_rules"]:
                con.print(styled(("matched nothing:", "yellow"), f" {r}"))
            if result["passthrough"]:
                con.print(f"{len(result['passthrough'])} keys pass through untouched", style="yellow")
        plans = (
            f"; plans {result['outputs']} outputs, {len(result['passthrough'])} pass through, "
            f"{len(result['unmatched_rules'])} optional rule(s) matched nothing"
            if args.against
            else ""
        )
        con.print(f"check: {spec.name!r} valid, {len(spec.rules)} rules{plans} -> ok", style="green")
    return EXIT_OK


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (examples stay one per line); each option's default shown."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


# Exit codes per command, shown by `statemap COMMAND --help` and in docs/cli.md (tests/test_cli_docs.py
# checks they agree).
EXIT_CODES = {
    "apply": "0 written (and matching --expect / the spec's expect, if any); 1 written or planned, but not matching "
    "the expectation (missing or unexpected keys, a shape or a dtype mismatch); 2 error; 130 interrupted",
    "check": "0 valid; 2 error",
    "diff": "0 same; 1 different (keys, shapes, dtypes, or with --values / --spec values beyond the tolerances); 2 error",
    "inspect": "0 ok; 2 error",
    "list": "0 ok",
    "invert": "0 complete (or every loss accepted), printed or written; 1 printed without -o but incomplete, or "
    "ambiguous (with -o, written all the same); 2 error (including -o with losses not accepted: nothing written)",
    "suggest": "0 drafted (with --values: and the draft reproduces TARGET bitwise); 1 with --values, the draft does not "
    "reproduce TARGET; 2 error",
    "lint": "0 clean (infos only); 1 at least one warning; 2 at least one error, or an error running it",
}

EXAMPLES = {
    "apply": [
        "statemap apply deltalm-fairseq-to-hf examples/deltalm-tiny.pt /tmp/deltalm-hf.safetensors --force",
        "statemap apply my-spec.yaml in.pt --dry-run",
        "statemap apply my-spec.yaml in.pt out.safetensors --set vocab=50265 --expect ref.safetensors",
        "statemap apply my-spec.yaml in.pt out.safetensors --max-shard-size 5GB --workers 4",
        "statemap apply nanogpt-to-gpt2-hf ckpt.pt --dry-run --expect hf:GPT2LMHeadModel --config config.json",
    ],
    "check": ["statemap check my-spec.yaml", "statemap check my-spec.yaml --against in.pt"],
    "diff": [
        "statemap diff a.pt b.safetensors",
        "statemap diff a.pt b.safetensors --values --atol 1e-4",
        "statemap diff source.pt converted.safetensors --spec my-spec.yaml",
        "statemap diff out.safetensors hf:BertModel --config config.json",
    ],
    "inspect": ["statemap inspect model.safetensors", "statemap inspect ckpt.pt --keys | grep attn"],
    "list": ["statemap list", "statemap list | grep gpt2", "statemap list --json"],
    "invert": ["statemap invert vit-timm-to-hf", "statemap invert vit-timm-to-hf -o vit-hf-to-timm.yaml"],
    "suggest": [
        "statemap suggest source.pt target.safetensors -o draft.yaml",
        "statemap suggest source.pt target.safetensors --values -o draft.yaml",
    ],
    "lint": ["statemap lint draft.yaml", "statemap lint draft.yaml --against source.pt"],
}


def _epilog(command: str) -> str:
    lines = ["examples:", *(f"  {e}" for e in EXAMPLES[command]), "", f"exit codes: {EXIT_CODES[command]}"]
    return "\n".join(lines)


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{n} is out of range: must be {minimum} or more")
        return n

    return parse


def _tolerance(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not x >= 0 or x == float("inf"):  # also NaN
        raise argparse.ArgumentTypeError(f"{text} is out of range: must be a finite number, 0 or more (e.g. 1e-6)")
    return x


def _size(text: str) -> str:
    from .write import parse_size

    try:
        n = parse_size(text)
    except StatemapError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not n:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range: must be more than 0 bytes, e.g. 5GB, 500MB")
    return text


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="statemap",
        description="Map PyTorch state dicts between layouts with YAML specs.",
        epilog="`statemap COMMAND --help` explains each command. Exit codes: 0 ok, 1 a difference, 2 an error, 130 interrupted.",
        formatter_class=_Help,
    )
    p.add_argument("--version", action="version", version=f"statemap {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        import textwrap

        text = textwrap.fill(description, 100)
        sp = sub.add_parser(name, help=summary, description=text, epilog=_epilog(name), formatter_class=_Help)
        return sp

    def common(sp: argparse.ArgumentParser, quiet: str = "print nothing but errors; --json still prints its JSON") -> None:
        sp.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout (no tables, no progress)")
        sp.add_argument("-q", "--quiet", action="store_true", help=quiet)

    def set_(sp: argparse.ArgumentParser, what: str = "a spec var") -> None:
        sp.add_argument(
            "--set", action="append", metavar="NAME=VALUE", help=f"override {what} (repeatable; default: the spec's vars)"
        )

    a = command(
        "apply",
        "convert a checkpoint with a spec",
        "Convert a checkpoint with a spec. Every check runs on metadata before a tensor is read; the output appears "
        "only when complete, never over an input. On a terminal, a progress bar shows tensors, bytes, rate and time "
        "left on stderr.",
    )
    a.add_argument("spec", help="spec file, or the name of a catalog spec (statemap list)")
    a.add_argument(
        "input",
        help="checkpoint file or directory, in any format statemap reads (docs/formats.md); for a spec with `inputs:` "
        "the folder of files, or a pattern ('ckpt/consolidated.{rank:int}.pth')",
    )
    a.add_argument(
        "output", nargs="?", help="output .safetensors, .pt / .pth / .bin / .ckpt, or .msgpack (Flax); omit with --dry-run"
    )
    set_(a)
    a.add_argument(
        "--expect",
        metavar="REF",
        help="reference checkpoint, key listing, or hf:ModelClass (with --config) to compare the result with "
        "(default: the spec's expect, if any)",
    )
    a.add_argument(
        "--config", metavar="CONFIG.json", help="model config for --expect hf:ModelClass (built without weights; default: none)"
    )
    a.add_argument(
        "--vars-from",
        metavar="FILE",
        help="JSON/YAML file the spec's {config: KEY} vars are read from (default: the spec's config:)",
    )
    a.add_argument("--dry-run", action="store_true", help="plan and report; read no tensor, write nothing")
    a.add_argument("--force", action="store_true", help="replace an existing output (never an input)")
    a.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        type=_size,
        help="shard safetensors output into files of at most SIZE, e.g. 5GB, 500MB or a number of bytes (default: one file)",
    )
    a.add_argument(
        "--tied",
        choices=("clone", "dedupe"),
        help="tied outputs: write each name (clone) or each group once (dedupe) (default: the spec's tied)",
    )
    a.add_argument(
        "--workers",
        type=_count(1),
        default=1,
        metavar="N",
        help="with --max-shard-size: write output shards in N parallel processes",
    )
    a.add_argument("--reverse", action="store_true", help="apply the spec's reverse (see statemap invert)")
    a.add_argument(
        "--accept-loss",
        action="append",
        metavar="KEY",
        help="with --reverse: accept that the reverse cannot restore what this key's rule removed (repeatable; 'all' "
        "for every loss; default: none accepted)",
    )
    a.add_argument(
        "--no-fsync", action="store_true", help="do not wait for the disk before the final rename (faster; less durable)"
    )
    a.add_argument(
        "--source-sha256",
        action="store_true",
        help="record the input's sha256 in a .safetensors output's metadata also when it is over 16 MiB (reads it "
        "once more; default: size and mtime only)",
    )
    a.add_argument("-v", "--verbose", action="store_true", help="also list every produced tensor (folded)")
    common(a)
    a.set_defaults(func=cmd_apply)

    d = command(
        "diff",
        "compare two checkpoints (exit 0 same, 1 different)",
        "Compare two checkpoints: keys on one side only, shape and dtype mismatches; with --values every B key is "
        "explained by A's content and common keys' values are compared; with --spec, B is compared with what SPEC "
        "makes of A.",
    )
    d.add_argument("a", help="first checkpoint, or hf:ModelClass (with --config)")
    d.add_argument("b", help="second checkpoint, or hf:ModelClass (with --config)")
    d.add_argument(
        "--values", action="store_true", help="also read every tensor: explain each B key by A's content, compare common keys"
    )
    d.add_argument(
        "--spec",
        metavar="SPEC",
        help="compare B with SPEC applied to A (in memory; implies --values; default: compare A and B as they are)",
    )
    set_(d, "a var of --spec")
    d.add_argument("--atol", type=_tolerance, default=1e-6, help="absolute tolerance for values, 0 or more")
    d.add_argument("--rtol", type=_tolerance, default=1e-5, help="relative tolerance for values, 0 or more")
    d.add_argument("--unwrap", metavar="KEY[/KEY]", help="state dict location inside both files (default: auto)")
    d.add_argument(
        "--config",
        metavar="CONFIG.json",
        help="model config when A or B is hf:ModelClass (built without weights; default: none)",
    )
    common(d)
    d.set_defaults(func=cmd_diff)

    i = command(
        "inspect",
        "tensors and parameters per module, folded by layer",
        "Tensors and parameters per module, folded by layer index (encoder.layer.{0-11}).",
    )
    i.add_argument(
        "file",
        help="checkpoint file or directory, in any format statemap reads (docs/formats.md), or a pattern naming several "
        "files ('ckpt/consolidated.{rank:int}.pth')",
    )
    i.add_argument("--depth", type=_count(1), default=2, help="module depth for keys without a layer index, 1 or more")
    i.add_argument("--keys", action="store_true", help="also list every key, folded by layer index")
    i.add_argument("--unwrap", metavar="KEY[/KEY]", help="state dict location inside the file (default: auto)")
    common(i)
    i.set_defaults(func=cmd_inspect)

    li = command(
        "list",
        "the catalog of shipped specs",
        "The catalog of shipped specs: name, description, source, target and how each was verified. Any name it "
        "prints can be passed where a spec is expected. Piped, each spec is one line.",
    )
    common(li)
    li.set_defaults(func=cmd_list)

    v = command(
        "invert",
        "write the reverse spec (lossy rules need a declared `inverse:`)",
        "Write the reverse of a spec as YAML (to stdout, or to -o), rule by rule in reverse order. Rules that drop "
        "information need a declared `inverse:`, or are listed as not restored.",
    )
    v.add_argument("spec", help="spec file, or the name of a catalog spec")
    v.add_argument("-o", "--output", metavar="OUT.yaml", help="write here (default: print to stdout)")
    v.add_argument("--force", action="store_true", help="replace an existing OUT.yaml")
    set_(v)
    v.add_argument(
        "--accept-loss",
        action="append",
        metavar="KEY",
        help="write the reverse although it cannot restore what this key's rule removed (repeatable; 'all' for every "
        "loss; default: none accepted)",
    )
    common(v, "print nothing but errors and the reverse spec itself (on stdout, without -o)")
    v.set_defaults(func=cmd_invert)

    sg = command(
        "suggest",
        "draft a spec from a source checkpoint and a target (checkpoint or key listing)",
        "Draft a spec from two layouts. The draft is a starting point: review every rule, then run statemap lint and "
        "statemap check --against.",
    )
    sg.add_argument("source", help="source checkpoint")
    sg.add_argument("target", help="target checkpoint, or a .json/.yaml listing {key: [shape]}")
    sg.add_argument("-o", "--output", metavar="DRAFT.yaml", help="write the draft here (default: print to stdout)")
    sg.add_argument("--force", action="store_true", help="replace an existing DRAFT.yaml")
    sg.add_argument(
        "--values",
        action="store_true",
        help="both hold the same weights: draft from the tensor values and check the draft reproduces TARGET bitwise",
    )
    sg.add_argument(
        "--accept",
        nargs="*",
        metavar="PATTERN",
        help="write rules marked VERIFY (no evidence in names or shapes) as active rules: all of them, or those whose "
        "source or target pattern matches a glob PATTERN (default: they are written commented out)",
    )
    common(sg, "print nothing but errors and the draft itself (on stdout, without -o)")
    sg.set_defaults(func=cmd_suggest)

    lt = command(
        "lint",
        "find rules that overlap, cascade, collide, are shadowed or match nothing",
        "Find rules that are probably wrong even though the spec is valid: rules that overlap, cascade, collide, are "
        "shadowed, or match nothing.",
    )
    lt.add_argument("spec", help="spec file, or the name of a catalog spec")
    lt.add_argument(
        "--against",
        metavar="CHECKPOINT",
        help="also plan against a checkpoint: rules matching nothing, plan errors (default: the spec alone)",
    )
    set_(lt)
    common(lt, "print only warnings and errors (no infos, no summary line)")
    lt.set_defaults(func=cmd_lint)

    c = command(
        "check",
        "validate a spec (and plan it against a checkpoint with --against)",
        "Validate a spec: every field, pattern, template and var. With --against, also plan it against a "
        "checkpoint's metadata (no tensor is read).",
    )
    c.add_argument("spec", help="spec file, or the name of a catalog spec")
    c.add_argument(
        "--against", metavar="CHECKPOINT", help="plan the spec against this checkpoint (default: validate the spec alone)"
    )
    set_(c)
    c.add_argument(
        "--vars-from",
        metavar="FILE",
        help="JSON/YAML file the spec's {config: KEY} vars are read from, with --against (default: the spec's config:)",
    )
    common(c)
    c.set_defaults(func=cmd_check)
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Option combinations that mean nothing: refused with the subcommand's usage (exit 2)."""
    from .load.hf_meta import is_hf_target

    cmd = args.command
    sub = _subparser(parser, cmd)
    if cmd == "apply":
        if args.output is None and not args.dry_run:
            sub.error("apply needs an OUTPUT (or --dry-run)")
        if args.workers > 1 and not args.max_shard_size:
            sub.error(f"--workers {args.workers} writes shards in parallel: it needs --max-shard-size (or use --workers 1)")
        if args.accept_loss and not args.reverse:
            sub.error("--accept-loss applies to --reverse only")
    if cmd == "check" and args.vars_from and not args.against:
        sub.error("--vars-from reads vars for planning with --against; without --against, leave it out")
    if cmd == "diff":
        if args.config and not (is_hf_target(args.a) or is_hf_target(args.b)):
            sub.error("--config is the model config for an hf:ModelClass side; neither A nor B is one")
        if args.set and not args.spec:
            sub.error("--set overrides vars of --spec; without --spec, leave it out")


def _subparser(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    return parser


def _inputs(args: argparse.Namespace) -> str:
    """The files a command was given, for an error that does not name its own."""
    names = [getattr(args, n, None) for n in ("spec", "input", "file", "a", "b", "source", "target", "against")]
    return ", ".join(str(n) for n in names if n)


def _fail(message: str) -> int:
    from .textsafe import show

    sys.stderr.write(f"statemap: error: {show(message)}\n")
    return EXIT_ERROR


def _metadata_only(args: argparse.Namespace) -> Any:
    """Commands that build metadata for every key and read no tensor run with the cyclic garbage
    collector paused (see statemap.gcpause): most of their time on a 200k-key index otherwise."""
    cmd = getattr(args, "command", "")
    if cmd == "inspect" or (cmd == "diff" and not args.values and not args.spec) or (cmd == "apply" and args.dry_run):
        return _paused_to_the_end()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _paused_to_the_end() -> Iterator[None]:
    """:func:`statemap.gcpause.paused` for the whole command, then, in the ``statemap`` command's own
    process, ``gc.freeze``: what the command built lives until the process exits, and a collection
    when the collector is switched back on would only walk it (~0.03 s after a dry run of a
    200k-key index: its lists of 200k names)."""
    import gc

    from .gcpause import paused
    from .process import is_command_process

    with paused():
        yield
        if is_command_process():  # (never in a caller's process: main(argv) from Python)
            gc.freeze()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. The one place every failure becomes one ``statemap: error:`` line.

    Exit codes: 0 ok, 1 a difference (diff, --expect, lint warnings), 2 an error (one line on
    stderr naming the file and the problem; never a traceback), 130 interrupted (Ctrl-C).
    """
    if argv is None:  # the statemap command's own process (not a call from Python): see statemap.process
        from .process import mark_command_process

        mark_command_process()
        code = _main(None)
        _leave(code)  # returns only when the interpreter's own way out is needed
        return code
    return _main(argv)


def _leave(code: int) -> None:
    """End the ``statemap`` command's own process at once with ``code``: stdout and stderr are
    flushed, then ``os._exit`` skips the interpreter's teardown, which frees every module's objects
    one by one (~0.025 s after a conversion: 5% of DeltaLM's, measured here; every file statemap
    writes is closed, renamed and, by default, fsynced before this point). Returns instead, for the
    usual exit, when anything may still need that teardown: an ``atexit`` callback (coverage,
    logging, multiprocessing register one), a profiler or tracer (``python -m cProfile -m
    statemap`` writes its stats after ``main`` returns), a non-daemon thread (the usual exit waits
    for it; it does not wait for daemon threads such as an idle transpose helper), or output that
    cannot be flushed."""
    import atexit
    import threading

    ncallbacks = getattr(atexit, "_ncallbacks", None)
    if ncallbacks is None or ncallbacks() or sys.getprofile() is not None or sys.gettrace() is not None:
        return
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon for t in threading.enumerate()):
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: the usual exit reports it as before
        return
    os._exit(code)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # with the subcommand's usage, not the top level's
        _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    _check_args(parser, args)
    try:
        with _progress(args), _metadata_only(args):
            return int(args.func(args))
    except StatemapError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        sys.stderr.write("statemap: interrupted; no partial output left\n")
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except MemoryError:
        return _fail(f"{_inputs(args)}: out of memory; the input claims more than this machine has")
    except RecursionError:
        return _fail(f"{_inputs(args)}: input nested too deeply to read")
    except OSError as e:
        where = e.filename if e.filename else _inputs(args)
        return _fail(f"{where}: {e.strerror or e}")
    except Exception as e:  # noqa: BLE001 - the CLI boundary: one line, never a traceback
        from .textsafe import short_repr

        detail = short_repr(str(e), 300) if str(e) else "no detail"
        return _fail(f"{_inputs(args)}: cannot process the input ({detail}); please report this as a bug")
