"""Benchmark statemap against `cp` and the naive torch pipeline, in one run, on this machine.

    python benchmarks/issue14.py [--dir DIR] [--vocab 250000] [--gpt2-layers 24] [--repeat 3] [--keep]
    python benchmarks/issue14.py --quick     # small sizes (vocab 32000, 6 GPT-2 layers), for a smoke run

Method (issue 14): every timed command writes a fresh file name, `sync` runs before each timed
command and then its input is read once (see `settle`), each statemap command is paired with `cp`
of its input (run right before or right after it, alternating), and the median of >= 3 pairs is
reported, raw (seconds) and per byte
written (seconds per byte of statemap's output over seconds per byte of cp's). Peak RSS from
/usr/bin/time. Each output is deleted right after it is measured: on this machine kind (a
Firecracker VM whose freed memory goes back to the host) the second command of a pair otherwise
wrote into pages the host had to fault in again, while the first reused those of the previous
pair's outputs; which command ran first decided the ratio (DeltaLM: 0.47 s then 0.69-1.3 s for
cp, or 0.36-0.39 s then 0.80-0.89 s for statemap), and with the deletion it no longer does. The pairs:

  statemap --no-fsync   vs  cp IN OUT
  statemap (fsync)      vs  cp IN OUT && sync OUT       (statemap fsyncs before its rename)
  naive pipeline        vs  cp IN OUT                   torch.load -> rename -> safetensors.torch.save_file

and, for DeltaLM, the same conversion to .pt and .msgpack, and sharded (--max-shard-size 500MB)
alone and with --workers 2 (the shards and the index in a fresh folder, counted together).
statemap runs with its bytecode cache written first (as a pip install leaves it), whatever
PYTHONDONTWRITEBYTECODE says.

on two conversions:

  deltalm   catalog `deltalm-fairseq-to-hf` on a DeltaLM-base-shaped fairseq .pt (12 + 6 layers,
            d = 768, ffn = 3072, fc1..fc4; one embedding shared by encoder, decoder and the output
            projection, as fairseq's --share-all-embeddings saves it; vocab 250,000: 1.45 GB)
  gpt2      catalog `gpt2-hf-to-nanogpt` (every Conv1D weight transposed) on a GPT-2-medium-sized
            Hugging Face checkpoint (24 layers, d = 1024, written by GPT2LMHeadModel.save_pretrained)

plus: the planner on 3k..200k MoE keys (CPU seconds, min of 3, in process); inspect / diff /
apply --dry-run of a 200k-key sharded index (index + 163 shard headers, tiny tensors); and
map_state_dict rename-only on a ~1.1 GB XLM-R-base-shaped torch state dict (time and extra peak
RSS, in a child process). Needs torch, safetensors and transformers (generators, naive pipeline).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENC, DEC, D, FFN, POS = 12, 6, 768, 3072, 1026
PY = sys.executable
SM = [PY, "-m", "statemap"]

NAIVE_DELTALM = """
import re, sys, torch
from safetensors.torch import save_file
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["model"]
out = {}
for k, v in sd.items():
    if k.endswith(".version"):
        continue
    k = "lm_head.weight" if k == "decoder.output_projection.weight" else re.sub(r"^(encoder|decoder)\\.", r"model.\\1.", k)
    out[k] = v
out["model.shared.weight"] = out["model.encoder.embed_tokens.weight"]
out["final_logits_bias"] = torch.zeros(1, out["lm_head.weight"].shape[0])
# save_file refuses shared storage: the script people write clones ties (or calls save_model)
seen = set()
for k, v in out.items():
    if v.data_ptr() in seen:
        out[k] = v.clone()
    seen.add(v.data_ptr())
save_file(out, sys.argv[2])
"""

NAIVE_GPT2 = """
import sys, torch
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1])
out = {}
for k, v in sd.items():
    if k.endswith((".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")):
        v = v.t().contiguous()
    out[k] = v
out["lm_head.weight"] = out["transformer.wte.weight"].clone()
save_file(out, sys.argv[2])
"""


# ------------------------------------------------------------------------------------ inputs


def deltalm_layout(vocab: int) -> dict[str, tuple[int, ...]]:
    """bench.py's DeltaLM-base layout, with 1026 positions and the tied output projection."""
    from bench import layout  # benchmarks/ is on sys.path when this script runs

    return layout(vocab, pos=POS, output_projection=True)


def make_deltalm(d: Path, vocab: int) -> Path:
    import torch

    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, s in deltalm_layout(vocab).items():
        if k in ("decoder.embed_tokens.weight", "decoder.output_projection.weight"):
            continue
        sd[k] = torch.randn(s, generator=g)
    emb = sd["encoder.embed_tokens.weight"]
    sd["decoder.embed_tokens.weight"] = emb  # --share-all-embeddings: one storage, three names
    sd["decoder.output_projection.weight"] = emb
    path = d / "deltalm.pt"
    torch.save({"model": sd, "args": None, "optimizer_history": []}, path)
    return path


def make_gpt2(d: Path, layers: int) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257)
    out = d / "gpt2-medium"
    GPT2LMHeadModel(cfg).save_pretrained(out)  # model.safetensors without the tied lm_head
    return out / "model.safetensors"


def make_index(d: Path, layers: int = 61, experts: int = 1088, n_shards: int = 163) -> Path:
    """A DeepSeek-V3-sized MoE index (about 200k keys) over shards holding tiny bf16 tensors."""
    keys = moe_keys(layers, experts)
    out = d / "moe-index"
    out.mkdir(exist_ok=True)
    per = -(-len(keys) // n_shards)
    wm = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        hdr, off = {}, 0
        for k in keys[s * per : (s + 1) * per]:
            hdr[k] = {"dtype": "BF16", "shape": [4, 4], "data_offsets": [off, off + 32]}
            off += 32
            wm[k] = name
        h = json.dumps(hdr).encode()
        h += b" " * (-len(h) % 8)
        with open(out / name, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + b"\0" * off)
    index = out / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 32 * len(keys)}, "weight_map": wm}))
    return index


def moe_keys(layers: int, experts: int) -> list[str]:
    keys = ["model.embed_tokens.weight"]
    for i in range(layers):
        keys += [f"model.layers.{i}.self_attn.{p}.weight" for p in ("q_proj", "kv_proj", "o_proj")]
        keys += [f"model.layers.{i}.{n}_layernorm.weight" for n in ("input", "post_attention")]
        keys.append(f"model.layers.{i}.mlp.gate.weight")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            keys.append(f"model.layers.{i}.mlp.shared_experts.{proj}.weight")
            keys += [f"model.layers.{i}.mlp.experts.{e}.{proj}.weight" for e in range(experts)]
    return [*keys, "model.norm.weight", "lm_head.weight"]


MOE_SPEC = """name: moe-rename
version: 1
rules:
  - rename: "model.embed_tokens.weight -> tok.weight"
  - rename: "model.layers.{i}.mlp.experts.{e}.{proj}.weight -> layers.{i}.moe.experts.{e}.{proj}.w"
  - rename: "model.layers.{i}.mlp.shared_experts.{proj}.weight -> layers.{i}.moe.shared.{proj}.w"
  - rename: "model.layers.{i}.mlp.gate.weight -> layers.{i}.moe.gate.w"
  - rename: "model.layers.{i}.self_attn.{p}.weight -> layers.{i}.attn.{p}.w"
  - rename: "model.layers.{i}.{n}_layernorm.weight -> layers.{i}.{n}_norm.w"
  - rename: "model.norm.weight -> norm.w"
  - rename: "lm_head.weight -> head.w"
"""

# ------------------------------------------------------------------------------------ timing


def settle(src: Path | None) -> None:
    """Before a timed command: `sync`, then read its input once, so it comes from the page cache.

    This machine kind (a Firecracker VM) pages out page-cache pages unused for 60 s (DAMON; a
    pair's first command once read its input from disk at ~60 MB/s: 24 s). See :func:`pairs` for
    the other preparation (each output removed right after it is measured)."""
    subprocess.run(["sync"], check=True)
    if src is None:
        return
    with open(src, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass


def timed(cmd: list[str], src: Path | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command (after :func:`settle`), from /usr/bin/time."""
    settle(src)
    r = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    wall, rss_kb = r.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss_kb) / 1024


def timed_cpu(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MB) of one command, after `sync`:
    on a shared machine the CPU time says what the command itself cost."""
    subprocess.run(["sync"], check=True)
    r = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    wall, user, system, rss_kb = r.stderr.strip().splitlines()[-1].split()
    return float(wall), float(user) + float(system), int(rss_kb) / 1024


def out_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir())
    return path.stat().st_size


def measured(cmd: list[str], out: Path, src: Path) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (MB) and bytes written of one command writing ``out`` (a file or a
    folder), which is deleted right after."""
    t, rss = timed(cmd, src)
    n = out_bytes(out)
    shutil.rmtree(out) if out.is_dir() else out.unlink()
    return t, rss, n


def pairs(
    name: str, src: Path, make_cmd, cp_sync: bool, repeat: int, d: Path, suffix: str = ".safetensors", folder: bool = False
) -> dict:
    """Median of `repeat` (command, cp) pairs, each to fresh names; ratios raw and per byte.

    ``folder``: the command writes several files (shards and an index) into a fresh folder,
    measured (and removed) as a whole."""
    rows = []
    for r in range(repeat):
        out = d / f"{name.replace(' ', '_').replace('/', '_')}-{r}.out{suffix}"
        if folder:
            out.mkdir()
        cp_out = d / f"{name.replace(' ', '_')}-{r}.cp"
        cp = ["sh", "-c", f'cp "{src}" "{cp_out}" && sync "{cp_out}"'] if cp_sync else ["cp", str(src), str(cp_out)]

        ours = (make_cmd(out / f"model{suffix}" if folder else out), out)
        # each output is removed right after it is measured, so both commands of a pair start from
        # the same free memory; and the order alternates (see the module docstring)
        if r % 2 == 0:
            (t, rss, nbytes), (tc, _, cbytes) = measured(*ours, src), measured(cp, cp_out, src)
        else:
            (tc, _, cbytes), (t, rss, nbytes) = measured(cp, cp_out, src), measured(*ours, src)
        rows.append((t, tc, t / tc, (t / nbytes) / (tc / cbytes), rss, nbytes))
    med = lambda i: statistics.median(x[i] for x in rows)  # noqa: E731
    res = {"name": name, "s": med(0), "cp_s": med(1), "raw": med(2), "per_byte": med(3), "rss": max(x[4] for x in rows)}
    res["bytes"] = rows[0][5]
    print(
        f"  {name:46s} {res['s']:6.2f} s  cp{'+sync' if cp_sync else ''} {res['cp_s']:5.2f} s  "
        f"raw x{res['raw']:.2f}  per byte x{res['per_byte']:.2f}  {res['bytes'] / 1e9:.2f} GB  RSS {res['rss']:.0f} MB",
        flush=True,
    )
    print(
        "    pairs, statemap s / cp s (statemap ran first in the 1st, 3rd, ...):",
        "  ".join(f"{x[0]:.2f}/{x[1]:.2f}" for x in rows),
        flush=True,
    )
    return res


def planner_scaling() -> list[tuple[int, float]]:
    from statemap import TensorMeta, load_spec, make_plan

    spec = load_spec(MOE_SPEC)
    rows = []
    for layers, experts in ((5, 192), (61, 64), (61, 256), (61, 1088)):
        metas = [TensorMeta(k, (4, 4), "bfloat16") for k in moe_keys(layers, experts)]
        best = float("inf")
        for _ in range(3):
            t = time.process_time()
            make_plan(spec, metas)
            best = min(best, time.process_time() - t)
        rows.append((len(metas), best))
        print(f"  planner {len(metas):7d} keys  {best:6.2f} s CPU  {best / len(metas) * 1e6:5.1f} us/key", flush=True)
    return rows


MAP_SD = """
import resource, sys, time, torch, statemap
V, D, F, L = 250002, 768, 3072, 12
sd = {"roberta.embeddings.word_embeddings.weight": torch.empty(V, D).normal_()}
for i in range(L):
    p = f"roberta.encoder.layer.{i}"
    for n, s in (("attention.self.query", (D, D)), ("attention.self.key", (D, D)), ("attention.self.value", (D, D)),
                 ("attention.output.dense", (D, D)), ("intermediate.dense", (F, D)), ("output.dense", (D, F))):
        sd[f"{p}.{n}.weight"] = torch.empty(s).normal_()
        sd[f"{p}.{n}.bias"] = torch.empty(s[0]).normal_()
spec = {"name": "r", "version": 1, "rules": [{"rename": "roberta.{rest:path} -> model.{rest}"}]}
statemap.map_state_dict(spec, {"roberta.x": torch.zeros(1)})  # imports and caches warm
nbytes = sum(v.numel() * v.element_size() for v in sd.values())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
out, _ = statemap.map_state_dict(spec, sd)
dt = time.perf_counter() - t
extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
same = all(out["model." + k[len("roberta."):]] is v for k, v in sd.items())
meta = {k: torch.empty(v.shape, device="meta", dtype=torch.bfloat16) for k, v in sd.items()}
mo, _ = statemap.map_state_dict(spec, meta)
ok_meta = all(v.device.type == "meta" and v.dtype == torch.bfloat16 for v in mo.values())
print(f"{nbytes} {dt} {extra} {same} {ok_meta}")
"""


def map_state_dict_bench() -> tuple[float, float, float, bool, bool]:
    r = subprocess.run([PY, "-c", MAP_SD], capture_output=True, text=True, check=True)
    nbytes, dt, extra, same, ok_meta = r.stdout.split()
    res = (int(nbytes) / 1e9, float(dt), float(extra), same == "True", ok_meta == "True")
    print(
        f"  map_state_dict rename-only, {res[0]:.2f} GB: {res[1]:.4f} s, +{res[2]:.1f} MB peak RSS, same objects: {res[3]}, meta bf16: {res[4]}"
    )
    return res


# ------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="work folder (default: a temp dir, removed at the end)")
    ap.add_argument("--vocab", type=int, default=250000, help="DeltaLM vocab (default 250000: a 1.45 GB .pt)")
    ap.add_argument("--gpt2-layers", type=int, default=24, help="GPT-2 layers (default 24: GPT-2 medium, 1.4 GB)")
    ap.add_argument("--repeat", type=int, default=3, help="pairs per measurement; the median is reported")
    ap.add_argument("--quick", action="store_true", help="vocab 32000, 6 GPT-2 layers")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()
    if args.quick:
        args.vocab, args.gpt2_layers = 32000, 6
    d = Path(args.dir or tempfile.mkdtemp(prefix="statemap-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    try:
        run(d, args)
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


def bytecode_cached() -> None:
    """Time statemap as installed: a pip install compiles its modules to .pyc files once. Without
    them (PYTHONDONTWRITEBYTECODE=1 in the environment, or a checkout never imported) every run
    compiles ~90 modules again: 0.15 s, a third of a page-cache `cp` of 1.45 GB."""
    import compileall

    import statemap

    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    ok = compileall.compile_dir(str(Path(statemap.__file__).parent), quiet=1)
    print(f"statemap bytecode cache {'ready' if ok else 'NOT written (timings include compiling)'}", flush=True)


def run(d: Path, args: argparse.Namespace) -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    bytecode_cached()
    print(f"load average at start: {os.getloadavg()[0]:.1f}; generating inputs in {d} ...", flush=True)
    pt = make_deltalm(d, args.vocab)
    gpt2 = make_gpt2(d, args.gpt2_layers)
    index = make_index(d)
    (d / "moe.yaml").write_text(MOE_SPEC)
    print(f"  deltalm .pt {pt.stat().st_size / 1e9:.2f} GB; gpt2 {gpt2.stat().st_size / 1e9:.2f} GB", flush=True)
    n = args.repeat
    results = {}
    for label, src, spec, naive in (
        ("deltalm", pt, "deltalm-fairseq-to-hf", NAIVE_DELTALM),
        ("gpt2", gpt2, "gpt2-hf-to-nanogpt", NAIVE_GPT2),
    ):
        src_arg = str(src.parent) if label == "gpt2" else str(src)

        def sm(extra: list[str], spec: str = spec, src_arg: str = src_arg):  # type: ignore[no-untyped-def]
            return lambda out: [*SM, "apply", spec, src_arg, str(out), "-q", *extra]

        def nv(out: Path, naive: str = naive, src: Path = src) -> list[str]:
            return [PY, "-c", naive, str(src), str(out)]

        results[label] = [
            pairs(f"{label}: statemap --no-fsync", src, sm(["--no-fsync"]), False, n, d),
            pairs(f"{label}: statemap (fsync)", src, sm([]), True, n, d),
            pairs(f"{label}: naive torch pipeline", src, nv, False, n, d),
            # streamed .pt (torch's zip format written directly) and Flax .msgpack: time and peak RSS
            pairs(f"{label}: statemap -> .pt --no-fsync", src, sm(["--no-fsync"]), False, n, d, ".pt"),
            pairs(f"{label}: statemap -> .msgpack --no-fsync", src, sm(["--no-fsync"]), False, n, d, ".msgpack"),
        ]
        if label == "deltalm":  # the sharded and --workers paths, per byte like the rest (three ~500 MB shards)
            shards = ["--no-fsync", "--max-shard-size", "500MB"]
            results[label] += [
                pairs(f"{label}: sharded --no-fsync", src, sm(shards), False, n, d, folder=True),
                pairs(f"{label}: sharded --workers 2 --no-fsync", src, sm([*shards, "--workers", "2"]), False, n, d, folder=True),
                pairs(f"{label}: sharded --workers 2 (fsync)", src, sm(shards[1:] + ["--workers", "2"]), True, n, d, folder=True),
            ]
    print("metadata commands on a 200k-key sharded index (wall s, CPU s, peak RSS MB, median of 3):", flush=True)
    meta = {}
    for name, cmd in (
        ("inspect", [*SM, "inspect", str(index), "-q"]),
        ("diff", [*SM, "diff", str(index), str(index), "-q"]),
        ("apply --dry-run", [*SM, "apply", str(d / "moe.yaml"), str(index), "--dry-run", "-q"]),
    ):
        runs = [timed_cpu(cmd) for _ in range(3)]
        med = tuple(statistics.median(r[i] for r in runs) for i in range(3))
        meta[name] = med
        print(f"  {name:16s} {med[0]:6.2f} s  CPU {med[1]:5.2f} s  {med[2]:6.0f} MB", flush=True)
    planner_scaling()
    map_state_dict_bench()
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
