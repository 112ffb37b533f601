"""Benchmark `statemap diff --values` (content correspondences) against reading both files once.

    python benchmarks/diff_values.py [--dir /tmp/statemap-dv] [--repeat 3] [--keep]

Two pairs of ~1.45 GB checkpoints whose second file is a split/transpose conversion of the first,
so that the row / column pass runs on most of the bytes (a rename-only pair is matched whole):

  deltalm   the DeltaLM-shaped fairseq .pt of bench.py (vocab 128000, 1.47 GB fp32) and
            bench.py's split/transpose conversion of it (q/k/v merged, fc1 split, every Linear
            transposed; .safetensors)
  gpt2      a GPT-2 medium HF checkpoint (Conv1D layout, d 1024, 24 layers, vocab 50257;
            .safetensors, 1.42 GB fp32) and its `statemap apply gpt2-hf-to-nanogpt` conversion
            (every Conv1D weight transposed)

For each pair, interleaved, `--repeat` times (the median is reported), each a separate process
under /usr/bin/time (wall seconds, peak RSS), page cache warmed first:

  cat both            `cat A B > /dev/null`: the bytes, at page-cache speed
  read both once      every tensor of A and of B through statemap's readers (one at a time)
  diff --values       `statemap diff A B --values -q` (target: <= 2x `read both once`)

Wall and CPU seconds (user + system) are both reported: on a loaded machine the wall ratio swings
with the load; the CPU ratio is the work done.

Interleaving matters on a shared machine: each round runs the three commands back to back, so
a burst of load hits all of them. Needs numpy, safetensors and torch (torch for the .pt only).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the DeltaLM layout, its split/transpose spec, the read-both script)

GPT2 = dict(d=1024, layers=24, vocab=50257, positions=1024)


def gpt2_layout(d: int, layers: int, vocab: int, positions: int) -> dict[str, tuple[int, ...]]:
    """GPT2LMHeadModel's saved keys (lm_head.weight is tied to wte and not saved)."""
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (vocab, d), "transformer.wpe.weight": (positions, d)}
    for i in range(layers):
        p = f"transformer.h.{i}"
        shapes |= {
            f"{p}.ln_1.weight": (d,),
            f"{p}.ln_1.bias": (d,),
            f"{p}.attn.c_attn.weight": (d, 3 * d),
            f"{p}.attn.c_attn.bias": (3 * d,),
            f"{p}.attn.c_proj.weight": (d, d),
            f"{p}.attn.c_proj.bias": (d,),
            f"{p}.ln_2.weight": (d,),
            f"{p}.ln_2.bias": (d,),
            f"{p}.mlp.c_fc.weight": (d, 4 * d),
            f"{p}.mlp.c_fc.bias": (4 * d,),
            f"{p}.mlp.c_proj.weight": (4 * d, d),
            f"{p}.mlp.c_proj.bias": (d,),
        }
    shapes |= {"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
    return shapes


def timed(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MB) and CPU seconds (user + system) of one command, from /usr/bin/time."""
    r = subprocess.run(["/usr/bin/time", "-f", "%e %M %U %S", *cmd], capture_output=True, text=True)
    if r.returncode not in (0, 1):  # diff exits 1: "different"
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    wall, rss_kb, user, system = r.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss_kb) / 1024, float(user) + float(system)


def generate(d: Path) -> dict[str, tuple[Path, Path]]:
    from safetensors.numpy import save_file

    sm = [sys.executable, "-m", "statemap"]
    pairs = {}
    pt = d / "deltalm.pt"
    if not pt.exists():
        import torch

        rng = np.random.default_rng(0)
        torch.save({k: torch.from_numpy(rng.standard_normal(s, dtype=np.float32)) for k, s in bench.layout(128000).items()}, pt)
    heavy = d / "deltalm-heavy.safetensors"
    if not heavy.exists():
        (d / "heavy.yaml").write_text(bench.HEAVY_SPEC)
        subprocess.run([*sm, "apply", str(d / "heavy.yaml"), str(pt), str(heavy), "-q", "--no-fsync"], check=True)
    pairs["deltalm (.pt vs split/transpose)"] = (pt, heavy)
    hf = d / "gpt2-medium.safetensors"
    if not hf.exists():
        rng = np.random.default_rng(1)
        save_file({k: rng.standard_normal(s, dtype=np.float32) for k, s in gpt2_layout(**GPT2).items()}, str(hf))
    nano = d / "gpt2-medium-nanogpt.safetensors"
    if not nano.exists():
        subprocess.run([*sm, "apply", "gpt2-hf-to-nanogpt", str(hf), str(nano), "-q", "--no-fsync"], check=True)
    pairs["gpt2-medium (HF vs nanoGPT)"] = (hf, nano)
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="work folder (default: a temp dir, removed at the end)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported (default 3)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()
    d = Path(args.dir or tempfile.mkdtemp(prefix="statemap-dv-"))
    d.mkdir(parents=True, exist_ok=True)
    try:
        run(d, args.repeat)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(d, ignore_errors=True)


def run(d: Path, repeat: int) -> None:
    print(f"generating in {d} ...", flush=True)
    pairs = generate(d)
    py = sys.executable
    rows = []
    for name, (a, b) in pairs.items():
        for f in (a, b):  # warm the page cache
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
        cases = {
            "cat both": ["sh", "-c", f"cat '{a}' '{b}' > /dev/null"],
            "read both once": [py, "-c", bench.READ_BOTH, str(a), str(b)],
            "diff --values": [py, "-m", "statemap", "diff", str(a), str(b), "--values", "-q"],
        }
        runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in cases}
        for _ in range(repeat):
            for case, cmd in cases.items():
                runs[case].append(timed(cmd))
        size = a.stat().st_size + b.stat().st_size
        med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
        cpu = {k: sorted(c for _, _, c in v)[len(v) // 2] for k, v in runs.items()}
        for case in cases:
            walls = " / ".join(f"{w:.2f}" for w, _, _ in runs[case])
            ratio = med[case][0] / med["read both once"][0]
            cratio = cpu[case] / cpu["read both once"]
            rows.append((name, case, walls, med[case][0], ratio, cpu[case], cratio, med[case][1]))
        print(
            f"  {name}: {size / 1e9:.2f} GB; diff --values {med['diff --values'][0]:.2f} s, read both {med['read both once'][0]:.2f} s",
            flush=True,
        )
    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load {os.getloadavg()[0]:.1f}"
    )
    print(f"median of {repeat} interleaved rounds, warm page cache")
    print()
    print("| pair | command | wall s (each run) | median wall s | x read both | median CPU s | CPU x read both | peak RSS MB |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, case, walls, m, ratio, c, cratio, rss in rows:
        print(f"| {name} | {case} | {walls} | {m:.2f} | {ratio:.2f} | {c:.2f} | {cratio:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
