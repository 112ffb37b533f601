"""The Python API: load -> plan -> apply -> write -> report, in one call or step by step."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import progress
from .apply import Segments, byte_segments, execute, execute_streaming, produce
from .errors import CheckpointError, StatemapError
from .load import Checkpoint, from_state_dict, open_checkpoint
from .meta import TensorMeta
from .plan import Plan, make_plan
from .report import Report
from .source import bind_vars, open_input, open_source
from .spec import Spec, load_spec
from .textsafe import short_repr
from .verify import run_checks
from .write import Written, check_outputs, check_resources, check_writer, output_files, output_format, write_checkpoint


def _version() -> str:
    from . import __version__

    return __version__


MAX_EXPECT_DIMS = 64


def _expect_meta(label: str, k: Any, v: Any) -> TensorMeta:
    """One entry of an expected key listing, checked: a shape list of non-negative ints, a known dtype."""
    if not isinstance(k, str):
        raise CheckpointError(f"{label}: key {short_repr(k, 80)} must be a string")
    shape, dt = (v.get("shape"), v.get("dtype", "")) if isinstance(v, Mapping) else (v, "")
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) > MAX_EXPECT_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 62 for d in shape)
    ):
        raise CheckpointError(
            f"{label}: entry {short_repr(k, 80)}: shape must be a list of at most {MAX_EXPECT_DIMS} non-negative "
            f"integers, got {short_repr(shape, 80)}; write e.g. {{{short_repr(k, 80)}: [768, 768]}}"
        )
    if dt is None or dt == "":
        dt = ""
    elif isinstance(dt, str) and len(dt) <= 64:
        from .dtypes import dtype as lookup_dtype

        try:
            dt = lookup_dtype(dt).name
        except StatemapError as e:
            raise CheckpointError(f"{label}: entry {short_repr(k, 80)}: {e}") from None
    else:
        raise CheckpointError(f"{label}: entry {short_repr(k, 80)}: dtype must be a name like float32, got {short_repr(dt, 80)}")
    return TensorMeta(k, tuple(shape), dt)


def load_expect(
    ref: str | os.PathLike[str] | Mapping[str, Any],
    config: str | os.PathLike[str] | None = None,
    produced: Collection[str] | None = None,
) -> tuple[dict[str, TensorMeta], str]:
    """An expected target layout: a checkpoint file, a JSON/YAML listing ``{key: shape}``, a dict,
    or ``hf:ClassName`` with ``config`` (built on the meta device: no weights, no download; under
    transformers 5 the saved or the in-memory layout, whichever the ``produced`` keys are closer to).

    A listing is checked whole (shapes are lists of non-negative ints, dtypes known) before any
    output is written, so a bad listing fails with one error and nothing to clean up.

    Example::

        >>> load_expect({"lm_head.weight": [50257, 768]})[0]["lm_head.weight"].shape
        (50257, 768)
    """
    from .load.hf_meta import hf_layout, is_hf_target

    if is_hf_target(ref):
        ck = hf_layout(str(ref), config, closest_to=produced)
        return dict(ck.metas), ck.path
    if isinstance(ref, Mapping):
        label = "the spec's expect list"
        return {str(k): _expect_meta(label, k, v) for k, v in ref.items()}, label
    p = Path(ref)
    if p.suffix in (".json", ".yaml", ".yml") and not p.name.endswith(".index.json"):
        try:
            import yaml

            from .fsutil import read_regular

            text = read_regular(p, 64 << 20, "expected key listing").decode("utf-8")
            data = yaml.safe_load(text) if p.suffix != ".json" else json.loads(text)
        except StatemapError:
            raise
        except Exception as e:
            raise CheckpointError(f"{p}: cannot read expected key listing: {str(e)[:200]}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{p}: expected key listing must map key -> shape (or {{shape, dtype}})")
        out = {}
        for k, v in data.items():
            if not isinstance(v, (dict, list)):
                raise CheckpointError(
                    f"{p}: entry {short_repr(k, 80)} must be a shape (a list of non-negative integers) or {{shape, dtype}}, "
                    f"got {short_repr(v, 80)}"
                )
            out[str(k)] = _expect_meta(str(p), k, v)
        return out, str(p)
    with open_checkpoint(p) as ck:
        return dict(ck.metas), str(p)


HASH_FREE = 16 << 20  # sources up to this size are hashed by default (~0.01 s, under a tenth of start-up)


def spec_digest(spec: Spec) -> str:
    """sha256 of the spec's canonical form (after shorthand normalization; comments, layout and
    `note:` fields do not count), so two spellings of one mapping hash alike."""
    import hashlib

    canon = {
        "name": spec.name,
        "version": spec.version,
        "vars": [list(v) for v in spec.vars],
        "unwrap": spec.unwrap,
        "strip_prefix": spec.strip_prefix,
        "strict": spec.strict,
        "tied": spec.tied,
        **({"inputs": [spec.inputs.files, spec.inputs.key]} if spec.inputs is not None else {}),
        **({"config": list(spec.config)} if spec.config is not None else {}),
        "rules": [
            [r.op, [str(s) for s in r.sources], [str(t) for t in r.targets], repr(r.params), r.optional, r.inverse]
            for r in spec.rules
        ],
    }
    return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()


def provenance(spec: Spec, source: str, inputs: Sequence[str] = (), *, source_sha256: bool = False) -> dict[str, str]:
    """The metadata a converted safetensors file carries: what made it, from what.

    The source's size and mtime are always recorded. Its sha256 is recorded when it is at most
    :data:`HASH_FREE` bytes or ``source_sha256`` asks for it: hashing reads the whole source once
    more, at ~1.7 GB/s here against ~3.7 GB/s for the kernel's copy, so by default a larger
    source would take ~3x as long to convert (measured: a 1.45 GB DeltaLM `.pt`, 0.51 s without
    the hash, 1.52 s with it).

    Example::

        >>> provenance(load_spec("deltalm-fairseq-to-hf"), "checkpoint_best.pt")["statemap.spec"]
        'deltalm-fairseq-to-hf'
    """
    import hashlib

    md = {
        "statemap.spec": spec.name,
        "statemap.spec_sha256": spec_digest(spec),
        "statemap.source": Path(source).name,
        "statemap.version": _version(),
    }
    p = Path(source)
    if inputs:  # several files: their names
        md["statemap.inputs"] = json.dumps([Path(f).name if Path(f).parent == p else os.path.relpath(f, p) for f in inputs])
        return md
    if p.is_file():
        st = p.stat()
        md["statemap.source_size"] = str(st.st_size)
        md["statemap.source_mtime"] = str(int(st.st_mtime))
        if st.st_size <= HASH_FREE or source_sha256:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            md["statemap.source_sha256"] = h.hexdigest()
        else:
            md["statemap.source_digest"] = (
                f"not hashed: larger than {HASH_FREE >> 20} MiB (hashing reads the whole source again); "
                "statemap apply --source-sha256 records it"
            )
    return md


def plan_for(spec: Spec, ck: Checkpoint) -> Plan:
    """Compile ``spec`` against an opened checkpoint (metadata only)."""
    if not ck.metas:
        raise CheckpointError(f"{ck.path}: holds no tensors; nothing to convert")
    spec.require_vars()
    from .errors import PlanError

    try:
        return make_plan(spec, ck.metas.values(), ck.tied_groups())
    except PlanError as e:
        text = str(e)
        if "matched no key" not in text:
            raise
        from .diagnose import wrong_input

        hint = wrong_input(spec, ck.metas, lambda other: _contradicts(other, ck))
        if hint is None:
            raise
        head = text.split("matched no key")[0]  # the rule's file:line, then the real mistake
        raise PlanError(f"{head}matched no key: {hint}") from None


def _contradicts(spec: Spec, ck: Checkpoint) -> bool:
    """Whether planning ``spec`` on ``ck`` stops at an ``assume:`` the input contradicts."""
    from .errors import AssumptionError, StatemapError

    try:
        make_plan(spec, ck.metas.values(), ck.tied_groups())
    except AssumptionError:
        return True
    except StatemapError:
        return False
    return False


def _input_rows(ck: Checkpoint) -> list[dict[str, Any]]:
    """One row per input file of a multi-file input: name, captures, format, tensor count, keys."""
    keys: list[list[str]] = [[] for _ in ck.inputs]
    for k, i in ck.files.items():
        keys[i].append(k)
    return [
        {
            "file": f.name,
            "captures": dict(f.captures),
            "format": f.format,
            "container": f.container,
            "stripped_prefix": f.stripped_prefix,
            "n_tensors": f.n_tensors,
            "keys": keys[i],
        }
        for i, f in enumerate(ck.inputs)
    ]


def _report(spec: Spec, ck: Checkpoint, plan: Plan, expect: Any, config: Any = None) -> Report:
    r = Report(
        spec=spec.name,
        source=ck.path,
        source_format=ck.format,
        container=ck.container,
        alternatives=list(ck.alternatives),
        stripped_prefix=ck.stripped_prefix,
        produced=plan.output_metas,
        passthrough=list(plan.passthrough),
        dropped=[k for k, _ in plan.dropped],
        unmatched_rules=[f"{r.loc}: {r.label}" for r in plan.unmatched],
        tied=[list(g) for g in plan.ties],
        source_ties=[list(g) for g in plan.source_ties],  # found once, by plan_for
        skipped=list(ck.skipped),
        conditions_not_met=[f"{r.loc}: {r.label}" for r in plan.not_met],
        assumptions=[f"{c.describe()}: {c.verified or 'verified by comparing bytes when applying'}" for c in plan.checks],
    )
    r.inputs = _input_rows(ck)
    if spec.config_label:
        r.vars_from = spec.config_label
    r.vars = dict(spec.vars)
    r.metas = {m.name: m for m in plan.dropped_metas}
    r.metas.update({k: ck.metas[k] for k in plan.passthrough if k in ck.metas})
    ref = expect if expect is not None else spec.expect
    if ref is not None:
        metas, label = load_expect(ref, config, produced=[m.name for m in plan.output_metas])
        r.compare(metas, label)
    return r


def _once(plan: Plan) -> list[list[str]]:
    """The groups ``tied: dedupe`` writes once: the kept name first, then the names left out."""
    return [list(g) for g in plan.same]


def _to_write(spec: Spec, plan: Plan, tied: str | None) -> list[Any]:
    policy = tied or spec.tied
    if policy == "clone":
        return list(plan.outputs)
    skip = {n for g in plan.same for n in g[1:]} | {n for g in plan.ties for n in g[1:]}
    return [o for o in plan.outputs if o.name not in skip]


class _Producer:
    """Random access to the i-th output tensor of a conversion, for parallel shard writers.

    Picklable (spec + source path), so worker processes are started with ``spawn`` — never
    ``fork``, which deadlocks when the parent holds threads (torch, jax). Each worker opens the
    checkpoint and plans once, on its first call; planning is deterministic, so it sees the same
    outputs in the same order as the parent.
    """

    def __init__(self, spec: Spec, source: str, tied: str | None) -> None:
        self.spec, self.source, self.tied = spec, source, tied
        self._state: tuple[Checkpoint, list[Any]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "source": self.source, "tied": self.tied, "_state": None}

    def __call__(self, i: int) -> Any:
        if self._state is None:
            ck = open_input(self.source, self.spec.inputs, self.spec.unwrap, self.spec.strip_prefix)
            self._state = (ck, _to_write(self.spec, plan_for(self.spec, ck), self.tied))
        ck, outs = self._state
        return produce(outs[i], ck.read, ck.locations)


def _output_ties(plan: Plan, outs: Sequence[Any]) -> list[list[str]]:
    """Names that are one tensor in the output (a .pt file stores each group once): the spec's
    ``tie`` groups, and source keys stored as one tensor that pass through untouched."""
    written = {o.name for o in outs}
    ties = [[n for n in g if n in written] for g in plan.ties]
    keep = set(plan.passthrough) & written
    ties += [[n for n in g if n in keep] for g in plan.source_ties]
    return [g for g in ties if len(g) > 1]


def _inputs(ck: Checkpoint, spec: Spec, expect: Any, config: Any) -> list[str]:
    """Every file a conversion reads: none of them may be an output, not even with ``force``."""
    files = [ck.path, spec.path, *(f.path for f in ck.inputs), *sorted({loc.file for loc in ck.locations.values()})]
    if spec.config_label and Path(spec.config_label).is_file():  # config: FILE or --vars-from FILE
        files.append(spec.config_label)
    files += [os.fspath(r) for r in (expect, config) if isinstance(r, (str, os.PathLike)) and not str(r).startswith("hf:")]
    return files


def convert(
    spec: Any,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    vars: Mapping[str, Any] | None = None,
    expect: Any = None,
    dry_run: bool = False,
    force: bool = False,
    max_shard_size: int | str | None = None,
    tied: str | None = None,
    on_tensor: Callable[[TensorMeta], None] | None = None,
    fsync: bool = True,
    reverse: bool = False,
    accept_loss: Sequence[str] = (),
    config: str | os.PathLike[str] | None = None,
    workers: int = 1,
    vars_from: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    source_sha256: bool = False,
) -> Report:
    """Convert a checkpoint file with a spec and write the result; return the report.

    ``src`` is a checkpoint file or folder; for a spec with ``inputs:`` the folder holding the
    files (or a pattern naming them: ``"ckpt/consolidated.{rank:int}.pth"``). ``vars_from``:
    a JSON/YAML file (or a mapping) the spec's ``{config: KEY}`` vars are read from, instead of
    the spec's ``config:``; ``vars`` still win. ``source_sha256``: record the source's sha256
    in a safetensors output's metadata even when it is larger than 16 MiB (it is read once more
    for it; see :func:`provenance`).

    Every check runs on metadata before any tensor is read; ``assume:`` facts the metadata
    cannot prove are verified by reading before anything is written; the output appears only
    when complete (atomic rename), and never over an input. With ``reverse=True`` the spec is
    inverted first; a reverse that cannot restore everything is refused unless every loss is
    named in ``accept_loss`` (a key or rule text each lost line contains, or ``"all"``).

    Example::

        >>> report = convert("deltalm-fairseq-to-hf", "checkpoint_best.pt", "model.safetensors", force=True)
        >>> report.ok, len(report.produced)
        (True, 395)
    """
    t0 = time.perf_counter()
    if workers < 1:
        raise StatemapError(f"workers={workers} is out of range: must be 1 or more")
    spec = load_spec(spec, vars)
    lost: tuple[str, ...] = ()
    if reverse:
        from .invert import invert

        inversion = invert(spec)
        if not inversion.usable:
            from .errors import PlanError

            raise PlanError(f"{spec.path}: cannot reverse {spec.name!r}: " + "; ".join(inversion.ambiguous))
        check_losses(spec, inversion.lost, accept_loss)
        spec, lost = inversion.spec, inversion.lost
    ck, spec = open_source(spec, src, vars_from)
    with ck:
        plan = plan_for(spec, ck)
        report = _report(spec, ck, plan, expect, config)
        report.not_restored = list(lost)
        if (tied or spec.tied) == "dedupe":
            report.written_once = _once(plan)
        report.dry_run = dry_run or dst is None
        if dst is not None:
            report.output = os.fspath(dst)
        if not report.dry_run:
            assert dst is not None
            check_writer(dst)
            outs = _to_write(spec, plan, tied)
            fmt = output_format(dst)
            streaming = fmt == "safetensors"
            if fmt == "flax":  # the file holds each module's members together: produce them in that order
                from .stream_formats import flax_tree_order

                outs = [outs[i] for i in flax_tree_order([o.meta for o in outs])]
            inputs = _inputs(ck, spec, expect, config)
            # the cheap checks first: every output file, free space, memory (write_checkpoint repeats
            # the file checks under its lock); then assumptions that read tensors; then writing
            check_outputs(output_files(dst, [o.meta for o in outs], max_shard_size), inputs, force)
            # every format streams: only tensors that are computed (not byte moves) are held, one at a time
            segs = [byte_segments(o.node, ck.locations) for o in outs]
            in_memory = [o.meta for o, seg in zip(outs, segs) if seg is None]
            check_resources(Path(dst), [o.meta for o in outs], in_memory, together=False)
            report.assumptions = run_checks(plan, ck.read)
            metadata = provenance(spec, ck.path, [f.path for f in ck.inputs], source_sha256=source_sha256)
            get = _Producer(spec, os.fspath(src), tied) if streaming and workers > 1 else None
            produced = execute_streaming(outs, ck.read, ck.locations)
            metas = [o.meta for o in outs]
            with progress.task(f"writing {Path(dst).name}", len(metas), sum(m.nbytes for m in metas)) as bar:

                def step(m: TensorMeta) -> None:
                    bar.advance(1, m.nbytes)
                    if on_tensor is not None:
                        on_tensor(m)

                written: Written = write_checkpoint(
                    dst,
                    metas,
                    (a for _, a in produced),
                    metadata=metadata,
                    max_shard_size=max_shard_size,
                    ties=_output_ties(plan, outs),
                    inputs=inputs,
                    force=force,
                    on_tensor=step,
                    fsync=fsync,
                    workers=workers,
                    get=get,
                    segments=[Segments(tuple(seg)) if seg is not None else None for seg in segs],
                )
            report.files = list(written.files)
            report.removed = list(written.removed)
            report.n_bytes = written.n_bytes
    report.seconds = time.perf_counter() - t0
    return report


def check_losses(spec: Spec, lost: Sequence[str], accept: Sequence[str]) -> None:
    """Refuse an incomplete reverse unless every lost line is accepted by name (or ``"all"``)."""
    from .errors import PlanError

    accept = [a for a in accept if a]
    unused = [a for a in accept if a != "all" and not any(a in line for line in lost)]
    if unused:
        raise PlanError(f"{spec.path}: --accept-loss {unused[0]!r} names no loss of the reverse of {spec.name!r}")
    if "all" in accept:
        return
    left = [line for line in lost if not any(a in line for a in accept)]
    if left:
        raise PlanError(
            f"{spec.path}: the reverse of {spec.name!r} cannot restore {len(left)} rule(s): "
            + "; ".join(left)
            + ". Declare `inverse:` on them, or accept the loss by name: --accept-loss KEY (or 'all')"
        )


def memory_source(
    spec: Spec, state_dict: Mapping[str, Any], vars_from: Any, caller: str
) -> tuple[Spec, Checkpoint, list[dict[str, Any]], tuple[Any] | None]:
    """An in-memory state dict as a checkpoint to plan on (shared by :func:`map_state_dict` and
    ``iter_state_dict``): the spec with its vars bound, the checkpoint, the report's input rows,
    and ``(device,)`` when every value is a torch tensor (their ties taken from one object under
    several names; ``device`` None when they sit on several), else None."""
    from dataclasses import replace

    from .load import finish_flat

    if spec.unwrap:
        raise CheckpointError(f"spec {spec.name!r} unwraps {'/'.join(spec.unwrap)!r}; pass that inner dict to {caller}")
    if vars_from is not None or (spec.config is not None and spec.config[0] == "checkpoint"):
        spec = bind_vars(spec, None, None, vars_from)
    input_rows: list[dict[str, Any]] = []
    if spec.inputs is not None:
        state_dict, input_rows = _join_inputs(spec, state_dict)
        spec = replace(spec, strip_prefix=())  # each state dict's prefix is stripped on its own
    if not (state_dict and all(type(v).__module__.startswith("torch") for v in state_dict.values())):
        return spec, finish_flat(from_state_dict(state_dict), spec.strip_prefix), input_rows, None
    from .torch_apply import torch_metas

    metas, ties = torch_metas(state_dict)
    ck = Checkpoint("<state_dict>", "memory", metas, state_dict.__getitem__)
    ck.storage_ids = {k: f"mem:{i}" for i, g in enumerate(ties) for k in g}
    devices = {v.device for v in state_dict.values()}
    return spec, finish_flat(ck, spec.strip_prefix), input_rows, (devices.pop() if len(devices) == 1 else None,)


def map_state_dict(
    spec: Any,
    state_dict: Mapping[str, Any],
    *,
    vars: Mapping[str, Any] | None = None,
    expect: Any = None,
    vars_from: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], Report]:
    """Apply a spec to an in-memory state dict (torch tensors or numpy arrays).

    For a spec with ``inputs:`` (several files), pass one state dict per file, keyed by the
    file's capture values joined by ``/`` (what the default key puts first):
    ``map_state_dict(spec, {"00": sd0, "01": sd1})`` reads ``00/layers.0.attention.wq.weight``.
    ``vars_from``: a config mapping (e.g. ``json.load(open("params.json"))``) or a JSON/YAML file
    for the spec's ``{config: KEY}`` vars.

    Returns ``(new_state_dict, report)``; values come back as the type they went in
    (torch in, torch out). Tied outputs are the same tensor object. Torch tensors are never
    copied through numpy: a renamed tensor comes back as the *same* object, dim-0 splits and
    slices as views, and the rest is computed with torch ops on the tensors' own device and
    dtype (bf16, fp8, cuda, meta).

    Example::

        >>> import torch
        >>> sd = {"encoder.layers.0.fc1.weight": torch.ones(4, 2), "encoder.version": torch.ones(1)}
        >>> spec = "name: t\\nversion: 1\\nrules:\\n  - drop: encoder.version\\n  - rename: encoder.{r:path} -> model.encoder.{r}\\n"
        >>> new_sd, report = map_state_dict(spec, sd)
        >>> list(new_sd), new_sd["model.encoder.layers.0.fc1.weight"] is sd["encoder.layers.0.fc1.weight"]
        (['model.encoder.layers.0.fc1.weight'], True)
        >>> # then: model.load_state_dict(new_sd, strict=True)
    """
    spec, ck, input_rows, torch_device = memory_source(load_spec(spec, vars), state_dict, vars_from, "map_state_dict")
    plan = plan_for(spec, ck)
    report = _report(spec, ck, plan, expect)
    report.inputs = input_rows
    if torch_device is not None:  # zero copy: recipes run as torch ops on the tensors' own device
        from .torch_apply import as_numpy, run_node_torch

        device = torch_device[0]
        report.assumptions = run_checks(plan, ck.read, lambda node: as_numpy(run_node_torch(node, ck.read, device)))
        out: dict[str, Any] = {}
        alias = {n: g[0] for g in plan.ties for n in g[1:]}
        emitted: set[int] = set()
        for planned in plan.outputs:
            first = alias.get(planned.name)
            if first in out:  # a tie: one tensor under several names
                out[planned.name] = out[first]
                continue
            t = run_node_torch(planned.node, ck.read, device)
            if id(t) in emitted:  # `copy`: independent tensors, even of an untouched source
                t = t.clone()
            emitted.add(id(t))
            out[planned.name] = t
        return out, report

    report.assumptions = run_checks(plan, ck.read)
    values = [v for sd in state_dict.values() for v in sd.values()] if spec.inputs is not None else state_dict.values()
    some_torch = any(type(v).__module__.startswith("torch") for v in values)  # mixed: torch out
    out = {}
    alias = {n: g[0] for g in plan.ties for n in g[1:]}
    for planned, a in execute(list(plan.outputs), ck.read):
        if planned.name in alias and alias[planned.name] in out:
            out[planned.name] = out[alias[planned.name]]
            continue
        a = a.copy() if not a.flags.owndata else a
        if some_torch:
            from .torch_adapter import to_torch

            a = to_torch(a, planned.node.dtype)
        out[planned.name] = a
    return out, report


def _join_inputs(spec: Spec, state_dicts: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``{"00": sd0, "01": sd1}`` -> one dict keyed as the spec's ``inputs:`` addresses them
    (each state dict's ``module.`` prefix stripped on its own), and the report's input rows."""
    from .load import finish_flat
    from .load.multi import memory_parts

    assert spec.inputs is not None
    if not isinstance(state_dicts, Mapping) or not state_dicts or not all(isinstance(v, Mapping) for v in state_dicts.values()):
        raise CheckpointError(
            f"spec {spec.name!r} reads several files ('inputs: {spec.inputs.files}'): pass one state dict per file, "
            f"keyed by its capture values, e.g. {{'00': sd0, '01': sd1}}"
        )
    joined: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for f, caps in memory_parts(state_dicts, spec.inputs):
        sd = state_dicts[f.name]
        names = [k for k in sd if isinstance(k, str)]
        if len(names) != len(sd):
            raise CheckpointError(f"<state_dicts>[{f.name!r}]: every key must be a string")
        probe = Checkpoint(f.name, "memory", {k: TensorMeta(k, (), "float32") for k in names}, sd.__getitem__)
        probe = finish_flat(probe, spec.strip_prefix)
        keys: list[str] = []
        for old, new in zip(names, probe.metas):
            name = spec.inputs.key_for(caps, new)
            if name in joined:
                raise CheckpointError(f"<state_dicts>: key {name!r} comes from two state dicts; check the 'inputs' key template")
            joined[name] = sd[old]
            keys.append(name)
        rows.append(
            {
                "file": f.name,
                "captures": caps,
                "format": "memory",
                "container": "",
                "stripped_prefix": probe.stripped_prefix,
                "n_tensors": len(names),
                "keys": keys,
            }
        )
    return joined, rows


def load_state_dict(path: str | os.PathLike[str], unwrap: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Read a checkpoint into a dict of torch tensors, safely (no code from the file runs).

    ``unwrap`` picks the state dict inside the file: ``"model/language_model"`` or
    ``("model", "language_model")``; None picks the model's (see ``Checkpoint.alternatives``).

    Example::

        >>> sd = load_state_dict("checkpoint_best.pt")          # fairseq: takes ["model"]
        >>> len(sd), type(sd["encoder.version"]).__name__
        (395, 'Tensor')
        >>> ema = load_state_dict("timm_train.pth.tar", unwrap="state_dict_ema")
    """
    from .torch_adapter import to_torch

    with open_checkpoint(path, unwrap) as ck:
        return {k: to_torch(ck.read(k), m.dtype) for k, m in ck.metas.items()}


def save_state_dict(
    state_dict: Mapping[str, Any], path: str | os.PathLike[str], *, force: bool = False, max_shard_size: int | str | None = None
) -> Written:
    """Write a dict of torch tensors (or numpy arrays) to safetensors or .pt, atomically.

    Example::

        >>> import torch
        >>> save_state_dict({"w": torch.zeros(2, 3)}, "saved.safetensors", force=True).files
        ('saved.safetensors',)
    """
    ck = from_state_dict(state_dict)
    metas = list(ck.metas.values())
    return write_checkpoint(path, metas, (ck.read(m.name) for m in metas), force=force, max_shard_size=max_shard_size)
