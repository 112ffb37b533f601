"""Benchmark statemap against `cp` and the naive torch pipeline, in one run, on this machine.

    python benchmarks/bench.py [--dir /tmp/statemap-bench] [--vocab 128000] [--keep]

Generates a DeltaLM-shaped fine-tuned checkpoint (fairseq layout: 12 encoder + 6 decoder
layers, d=768, ffn=3072, fc1..fc4; the vocab is chosen so the file is ~1.5 GB fp32) as `.pt`
and `.safetensors`, then measures, each as a separate process under /usr/bin/time (wall
seconds, peak RSS), after warming the page cache:

  cp                        copy the .safetensors file
  cp + fsync                the same, then wait for the disk (statemap fsyncs before renaming)
  naive torch pipeline      import torch; torch.load -> regex rename -> safetensors save_file
  statemap rename (.st)     rename-only spec, .safetensors -> .safetensors (and with --no-fsync)
  statemap rename (.pt)     rename-only spec, .pt -> .safetensors
  statemap split/transpose  q/k/v merged, fc1 split along dim 0, every Linear weight transposed
                            (also as 4 shards written by 1 and by 2 worker processes)
  statemap diff             diff of the .pt and the .safetensors (metadata)
  read both once            every tensor of the .pt and of its renamed conversion, with statemap's readers
  statemap diff --values    content correspondences of the .pt and its renamed conversion (target:
                            <= 2x `read both once`), and of the .pt and its split/transpose conversion
  statemap inspect          inspect of the .pt
  statemap dry-run          apply --dry-run of the rename spec on the .pt

Prints a table with the ratio of each to `cp` and to the naive pipeline. Needs torch and
safetensors (for the generator and the naive pipeline only).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ENC, DEC, D, FFN, POS = 12, 6, 768, 3072, 514

RENAME_SPEC = """name: bench-rename
version: 1
rules:
  - drop: ["encoder.version", "decoder.version"]
  - rename: "encoder.{rest:path} -> model.encoder.{rest}"
  - rename: "decoder.{rest:path} -> model.decoder.{rest}"
"""

HEAVY_SPEC = """name: bench-split-transpose
version: 1
rules:
  - drop: ["encoder.version", "decoder.version"]
  - merge:
      from: ["{s}.layers.{i}.{a}_attn.q_proj.weight", "{s}.layers.{i}.{a}_attn.k_proj.weight", "{s}.layers.{i}.{a}_attn.v_proj.weight"]
      to: "{s}.layers.{i}.{a}_attn.in_proj_weight"
  - merge:
      from: ["{s}.layers.{i}.{a}_attn.q_proj.bias", "{s}.layers.{i}.{a}_attn.k_proj.bias", "{s}.layers.{i}.{a}_attn.v_proj.bias"]
      to: "{s}.layers.{i}.{a}_attn.in_proj_bias"
  - split: {from: "{s}.layers.{i}.fc1.weight", to: ["{s}.layers.{i}.fc1a.weight", "{s}.layers.{i}.fc1b.weight"], dim: 0}
  - transpose: {from: "{s}.layers.{i}.{a}_attn.out_proj.weight", to: "{s}.layers.{i}.{a}_attn.out_proj.kernel"}
  - transpose: {from: "{s}.layers.{i}.fc{n}.weight", to: "{s}.layers.{i}.fc{n}.kernel"}
"""

NAIVE = """
import re, sys, torch
from safetensors.torch import save_file
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
out = {}
for k, v in sd.items():
    if k.endswith(".version"):
        continue
    out[re.sub(r"^(encoder|decoder)\\.", r"model.\\1.", k)] = v.contiguous()
save_file(out, sys.argv[2])
"""

READ_BOTH = """
import sys
from statemap.load import open_checkpoint
for p in sys.argv[1:]:
    with open_checkpoint(p) as ck:
        for k in ck.metas:
            ck.read(k)
"""


def layout(vocab: int, pos: int = POS, output_projection: bool = False) -> dict[str, tuple[int, ...]]:
    """A DeltaLM-base-shaped fairseq key layout (name -> shape); also used by issue14.py."""
    shapes: dict[str, tuple[int, ...]] = {}
    for side, n, dec in (("encoder", ENC, False), ("decoder", DEC, True)):
        shapes[f"{side}.version"] = (1,)
        shapes[f"{side}.embed_tokens.weight"] = (vocab, D)
        shapes[f"{side}.embed_positions.weight"] = (pos, D)
        shapes[f"{side}.layernorm_embedding.weight"] = (D,)
        shapes[f"{side}.layernorm_embedding.bias"] = (D,)
        for i in range(n):
            p = f"{side}.layers.{i}"
            for attn in ("self_attn", "encoder_attn") if dec else ("self_attn",):
                for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
                    shapes[f"{p}.{attn}.{proj}.weight"] = (D, D)
                    shapes[f"{p}.{attn}.{proj}.bias"] = (D,)
                shapes[f"{p}.{attn}_layer_norm.weight"] = (D,)
                shapes[f"{p}.{attn}_layer_norm.bias"] = (D,)
            for fc in ("fc1", "fc3") if dec else ("fc1",):
                shapes[f"{p}.{fc}.weight"] = (FFN, D)
                shapes[f"{p}.{fc}.bias"] = (FFN,)
            for fc in ("fc2", "fc4") if dec else ("fc2",):
                shapes[f"{p}.{fc}.weight"] = (D, FFN)
                shapes[f"{p}.{fc}.bias"] = (D,)
            for ln in ("final_layer_norm", "ffn_layer_norm") if dec else ("final_layer_norm",):
                shapes[f"{p}.{ln}.weight"] = (D,)
                shapes[f"{p}.{ln}.bias"] = (D,)
    if output_projection:
        shapes["decoder.output_projection.weight"] = (vocab, D)
    return shapes


def generate(d: Path, vocab: int) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    sd = {k: torch.from_numpy(rng.standard_normal(s, dtype=np.float32)) for k, s in layout(vocab).items()}
    pt, st = d / "deltalm.pt", d / "deltalm.safetensors"
    torch.save(sd, pt)
    save_file(sd, str(st))
    return pt, st


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command, from /usr/bin/time."""
    fmt = "%e %M"
    r = subprocess.run(["/usr/bin/time", "-f", fmt, *cmd], capture_output=True, text=True)
    if r.returncode != 0 and not (r.returncode == 1 and "diff" in cmd):  # diff exits 1: "different"
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    wall, rss_kb = r.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss_kb) / 1024


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="work folder (default: a temp dir, removed at the end)")
    ap.add_argument("--vocab", type=int, default=128000, help="rows of each embedding (default 128000: ~1.5 GB in all)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()
    d = Path(args.dir or tempfile.mkdtemp(prefix="statemap-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    try:
        run(d, args.vocab, args.repeat)
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


def run(d: Path, vocab: int, repeat: int) -> None:
    print(f"generating a DeltaLM-shaped checkpoint in {d} ...", flush=True)
    pt, st = generate(d, vocab)
    size = st.stat().st_size
    (d / "rename.yaml").write_text(RENAME_SPEC)
    (d / "heavy.yaml").write_text(HEAVY_SPEC)
    py = sys.executable
    sm = [py, "-m", "statemap"]
    out = d / "out.safetensors"
    (d / "shards").mkdir(exist_ok=True)
    shard_out = d / "shards" / "model.safetensors"
    sharded = ["--force", "-q", "--no-fsync", "--max-shard-size", "400MB"]
    renamed, heavy = d / "renamed.safetensors", d / "heavy.safetensors"  # the conversions `diff --values` explains
    for spec, dst in (("rename.yaml", renamed), ("heavy.yaml", heavy)):
        subprocess.run([*sm, "apply", str(d / spec), str(pt), str(dst), "--force", "-q", "--no-fsync"], check=True)
    for f in (pt, st, renamed, heavy):  # warm the page cache
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass

    cp_fsync = [
        py,
        "-c",
        "import os, shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2]); fd = os.open(sys.argv[2], os.O_RDONLY); os.fsync(fd)",
        str(st),
        str(out),
    ]
    cases = [
        ("cp", ["cp", str(st), str(out)]),
        ("cp + fsync (what statemap guarantees)", cp_fsync),
        ("naive torch pipeline (.pt)", [py, "-c", NAIVE, str(pt), str(out)]),
        ("statemap rename (.safetensors)", [*sm, "apply", str(d / "rename.yaml"), str(st), str(out), "--force", "-q"]),
        ("statemap rename (.pt)", [*sm, "apply", str(d / "rename.yaml"), str(pt), str(out), "--force", "-q"]),
        (
            "statemap rename (.safetensors) --no-fsync",
            [*sm, "apply", str(d / "rename.yaml"), str(st), str(out), "--force", "-q", "--no-fsync"],
        ),
        (
            "statemap rename (.pt) --no-fsync",
            [*sm, "apply", str(d / "rename.yaml"), str(pt), str(out), "--force", "-q", "--no-fsync"],
        ),
        ("statemap split/transpose (.pt)", [*sm, "apply", str(d / "heavy.yaml"), str(pt), str(out), "--force", "-q"]),
        (
            "statemap split/transpose (.pt) --no-fsync",
            [*sm, "apply", str(d / "heavy.yaml"), str(pt), str(out), "--force", "-q", "--no-fsync"],
        ),
        ("  same, 4 shards, 1 worker", [*sm, "apply", str(d / "heavy.yaml"), str(pt), str(shard_out), *sharded]),
        (
            "  same, 4 shards, --workers 2",
            [*sm, "apply", str(d / "heavy.yaml"), str(pt), str(shard_out), *sharded, "--workers", "2"],
        ),
        ("statemap diff (.pt vs .safetensors)", [*sm, "diff", str(pt), str(st), "-q"]),
        ("read both once (.pt, renamed .safetensors)", [py, "-c", READ_BOTH, str(pt), str(renamed)]),
        ("statemap diff --values (.pt vs renamed)", [*sm, "diff", str(pt), str(renamed), "--values", "-q"]),
        ("statemap diff --values (.pt vs split/transp.)", [*sm, "diff", str(pt), str(heavy), "--values", "-q"]),
        ("statemap inspect (.pt)", [*sm, "inspect", str(pt), "-q"]),
        ("statemap apply --dry-run (.pt)", [*sm, "apply", str(d / "rename.yaml"), str(pt), "--dry-run", "-q"]),
    ]
    results = []
    for name, cmd in cases:
        runs = []
        for _ in range(repeat):
            for old in [out, *(d / "shards").iterdir()]:  # no replaced files inside a timed run
                if old.exists():
                    old.unlink()
            runs.append(timed(cmd))
        runs.sort()
        results.append((name, *runs[len(runs) // 2]))
        print(f"  {name:44s} {runs[len(runs) // 2][0]:6.2f} s", flush=True)

    cp_s = results[0][1]
    naive_s = results[2][1]
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    print(
        f"checkpoint: {len(layout(vocab))} tensors, {size / 1e9:.2f} GB fp32 (vocab {vocab}); median of {repeat} runs, warm page cache"
    )
    print()
    print(f"| {'command':44s} | wall s | x cp  | naive / this | peak RSS MB |")
    print(f"|{'-' * 46}|-------:|------:|-------------:|------------:|")
    for name, s, rss in results:
        print(f"| {name:44s} | {s:6.2f} | {s / cp_s:5.2f} | {naive_s / s:12.1f} | {rss:11.0f} |")


if __name__ == "__main__":
    main()
