"""No catalog spec drops a weight on an unchecked assumption.

Every `drop` in the catalog is one of:
- verified: it carries `assume:` (checked against the bytes or the storage) or `when:` (decided
  from metadata, e.g. `tied_to`);
- a buffer or metadata entry that is not a learned weight (BUFFERS below, each with its reason);
- a weight the TARGET has no parameter for, listed in LOSSY_BY_DESIGN with the reason: those are
  part of what the spec says it converts (the report lists every dropped key with its shape).
A new unverified drop fails this test until it is verified or reviewed into one of the lists.
"""

from __future__ import annotations

import re

import statemap
from statemap.catalog import names

BUFFERS = {
    r"(^|\.)position_ids$": "arange buffer transformers rebuilds (non-persistent in 4.57)",
    r"(^|\.)embeddings\.\{b\}_ids$": "position_ids / token_type_ids buffers of older transformers (arange / zeros, rebuilt)",
    r"(^|\.)attn\.(masked_)?bias$": "GPT-2 causal-mask buffers (non-persistent in 4.57; nanoGPT without flash attention)",
    r"(^|\.)version$": "fairseq's format-version marker (a 1-element float), not a weight",
    r"^(attn_mask|input_resolution|context_length|vocab_size)$": "OpenAI CLIP: the causal mask buffer and integer metadata",
    r"(^|[./])rope\.freqs$": "Meta LLaMA 1's precomputed rotary frequencies (a buffer; HF recomputes them)",
    r"\.rotary_emb\.inv_freq$": "rotary frequency buffers of older transformers (recomputed by both models)",
    r"\(in_proj\|out_proj\|fc1\|fc2\)_\(weight\|bias\)": "fairseq 0.12 BetterTransformer buffers, rebuilt from q/k/v_proj, fc1, fc2 by fairseq on every load",
}

LOSSY_BY_DESIGN = {
    ("vit-hf-to-clip-vision", "pooler.dense.{p}"): "ViTModel's pooler: CLIPVisionModel has none",
    ("vit-hf-to-clip-vision", "classifier.{p}"): "ViTForImageClassification's head: CLIPVisionModel has none",
    (
        "vit-hf-to-clip-vision",
        "embeddings.patch_embeddings.projection.bias",
    ): "CLIP's patch conv has no bias (docs give the fold)",
    ("vit-hf-to-timm", "pooler.dense.{p}"): "ViTModel's pooler: timm's VisionTransformer has none",
}


def _unverified_drops() -> dict[tuple[str, str], bool]:
    out = {}
    for name in names():
        for rule in statemap.load_spec(name).rules:
            if rule.op == "drop" and not (rule.assume or rule.when):
                out[(name, str(rule.sources[0]))] = rule.optional
    return out


def test_every_catalog_drop_is_verified_a_buffer_or_reviewed():
    unexplained = [
        key for key in _unverified_drops() if key not in LOSSY_BY_DESIGN and not any(re.search(p, key[1]) for p in BUFFERS)
    ]
    assert not unexplained, f"unverified drops of possible weights: {unexplained}"


def test_the_reviewed_lists_are_not_stale():
    drops = _unverified_drops()
    assert set(LOSSY_BY_DESIGN) <= set(drops), set(LOSSY_BY_DESIGN) - set(drops)
    for pattern in BUFFERS:
        assert any(re.search(pattern, key[1]) for key in drops), f"no catalog drop needs {pattern!r} any more"


def test_the_check_can_fail():
    """A tied-head drop without `assume:` / `when:` is exactly what the first test must catch."""
    spec = statemap.load_spec("name: t\nversion: 1\nrules:\n  - drop: {from: lm_head.weight, optional: true}\n")
    rule = spec.rules[0]
    assert rule.op == "drop" and not (rule.assume or rule.when)
    assert not any(re.search(p, str(rule.sources[0])) for p in BUFFERS)
