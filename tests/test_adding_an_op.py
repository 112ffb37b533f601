"""The "adding an op" example of docs/architecture.md works as written: one module, and the
planner, invert, lint and the schema pick the op up without a change (run in a fresh process,
so the extra op does not leak into the registry other tests see)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

CHECK = textwrap.dedent(
    """
    import importlib.util, sys
    import torch
    import statemap, statemap.ops
    spec = importlib.util.spec_from_file_location("statemap.ops.flip", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["statemap.ops.flip"] = mod
    spec.loader.exec_module(mod)

    from statemap.invert import invert
    from statemap.lint import lint
    from statemap.schema import build_schema

    s = statemap.load_spec({"name": "t", "version": 1, "rules": [{"flip": {"from": "w", "to": "v", "dim": 1}}]})
    w = torch.randn(3, 4)
    out, _ = statemap.map_state_dict(s, {"w": w})
    assert torch.equal(out["v"], torch.flip(w, [1]))
    assert not torch.equal(out["v"], w)
    inv = invert(s)
    assert inv.lossless and inv.data["rules"][0]["flip"]["from"] == "v"
    back, _ = statemap.map_state_dict(inv.spec, out)
    assert torch.equal(back["w"], w)
    assert "op_flip" in build_schema()["$defs"]
    assert lint(s) == []
    print("ok")
    """
)


def test_the_documented_op_is_one_module(root, tmp_path):
    text = (root / "docs" / "architecture.md").read_text()
    code = re.search(r"```python\n# statemap/ops/flip.py\n(.*?)```", text, re.S).group(1)
    path = tmp_path / "flip.py"
    path.write_text(code)
    check = tmp_path / "check.py"
    check.write_text(CHECK)
    r = subprocess.run([sys.executable, str(check), str(path)], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_every_op_declares_typed_params_matching_its_fields():
    """Each op's Params dataclass has exactly its non-key fields, with the same defaults."""
    import dataclasses

    from statemap.ops import REGISTRY
    from statemap.ops.base import KEY_FIELDS

    for name, op in REGISTRY.items():
        assert dataclasses.is_dataclass(op.Params) and op.Params.__dataclass_params__.frozen, name
        params = {f.name: f for f in dataclasses.fields(op.Params)}
        declared = {k: f for k, f in op.fields.items() if k not in KEY_FIELDS}
        assert set(params) == set(declared), (name, sorted(params), sorted(declared))
        for k, f in declared.items():
            default = params[k].default
            if f.required:
                assert default is dataclasses.MISSING, (name, k)
            else:
                assert default == f.default, (name, k, default, f.default)
