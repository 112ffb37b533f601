"""Regenerate examples/deltalm-tiny.pt: a tiny fairseq DeltaLM checkpoint in the real container.

The checkpoint has the exact structure of a fine-tuned fairseq DeltaLM checkpoint (seed 001):
``args`` (argparse.Namespace), ``cfg`` (an omegaconf DictConfig, as fairseq >= 0.10 pickles it),
``model`` (395 tensors with the seed's key names, dims shrunk), ``criterion``,
``optimizer_history``, ``task_state``, ``extra_state``, ``last_optimizer_state``.

Needs torch and omegaconf (pip install omegaconf==2.3.0). statemap itself reads the result
without omegaconf and without running any code from the file.

    python examples/make_deltalm_tiny.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from seed_layouts import deltalm_finetuned  # noqa: E402

DIMS = dict(d=16, ffn=32, vocab=64, pos=34, enc=12, dec=6)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = deltalm_finetuned(**DIMS)
    model = {}
    for k, s in shapes.items():
        model[k] = torch.tensor([1.0]) if k.endswith("version") else torch.randn(s, generator=g) * 0.1
    model["decoder.output_projection.weight"] = model["decoder.embed_tokens.weight"]  # tied, as fairseq saves it
    args = argparse.Namespace(
        arch="deltalm_base",
        encoder_layers=DIMS["enc"],
        decoder_layers=DIMS["dec"],
        encoder_embed_dim=DIMS["d"],
        share_all_embeddings=True,
        max_source_positions=DIMS["pos"] - 2,
    )
    cfg = OmegaConf.create(
        {
            "model": {"_name": "deltalm_base", "encoder_layers": DIMS["enc"], "decoder_layers": DIMS["dec"]},
            "task": {"_name": "translation", "source_lang": "en", "target_lang": "de"},
        }
    )
    ckpt = {
        "args": args,
        "cfg": cfg,
        "model": model,
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "LabelSmoothedCrossEntropyCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": 3.2},
                "num_updates": 100,
            }
        ],
        "task_state": {},
        "extra_state": {"epoch": 1, "val_loss": 3.2},
        "last_optimizer_state": {"state": {0: {"step": torch.tensor(100.0)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
    }
    out = HERE / "deltalm-tiny.pt"
    torch.save(ckpt, out)
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(model)} tensors)")


if __name__ == "__main__":
    main()
