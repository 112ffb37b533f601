"""Key layouts from the seed notes (shared/seeds/001), with dims as parameters.

Key names and per-layer structure are copied from the listings in the notes; only the
sizes shrink so tests stay small. The full-size numbers are the defaults.
"""

from __future__ import annotations

DELTALM_PRETRAINED_EMBED = ["embed_tokens.weight", "embed_positions.weight", "emb_layer_norm.weight", "emb_layer_norm.bias"]
DELTALM_PRETRAINED_ENC_LAYER = [
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "ffn.fc1.weight",
    "ffn.fc1.bias",
    "ffn.fc2.weight",
    "ffn.fc2.bias",
    "self_attn_layer_norm.weight",
    "self_attn_layer_norm.bias",
    "final_layer_norm.weight",
    "final_layer_norm.bias",
]
DELTALM_PRETRAINED_DEC_LAYER = [
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "encoder_attn.q_proj.weight",
    "encoder_attn.q_proj.bias",
    "encoder_attn.k_proj.weight",
    "encoder_attn.k_proj.bias",
    "encoder_attn.v_proj.weight",
    "encoder_attn.v_proj.bias",
    "encoder_attn.out_proj.weight",
    "encoder_attn.out_proj.bias",
    "ffn_1.fc1.weight",
    "ffn_1.fc1.bias",
    "ffn_1.fc2.weight",
    "ffn_1.fc2.bias",
    "ffn_2.fc1.weight",
    "ffn_2.fc1.bias",
    "ffn_2.fc2.weight",
    "ffn_2.fc2.bias",
    "self_attn_layer_norm.weight",
    "self_attn_layer_norm.bias",
    "encoder_attn_layer_norm.weight",
    "encoder_attn_layer_norm.bias",
    "final_layer_norm.weight",
    "final_layer_norm.bias",
    "ffn_layer_norm.weight",
    "ffn_layer_norm.bias",
]
DELTALM_FT_EMBED = [
    "version",
    "embed_tokens.weight",
    "embed_positions.weight",
    "layernorm_embedding.weight",
    "layernorm_embedding.bias",
]
DELTALM_FT_ENC_LAYER = [
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "self_attn_layer_norm.weight",
    "self_attn_layer_norm.bias",
    "fc1.weight",
    "fc1.bias",
    "fc2.weight",
    "fc2.bias",
    "final_layer_norm.weight",
    "final_layer_norm.bias",
]
DELTALM_FT_DEC_LAYER = [
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "self_attn_layer_norm.weight",
    "self_attn_layer_norm.bias",
    "encoder_attn.k_proj.weight",
    "encoder_attn.k_proj.bias",
    "encoder_attn.v_proj.weight",
    "encoder_attn.v_proj.bias",
    "encoder_attn.q_proj.weight",
    "encoder_attn.q_proj.bias",
    "encoder_attn.out_proj.weight",
    "encoder_attn.out_proj.bias",
    "encoder_attn_layer_norm.weight",
    "encoder_attn_layer_norm.bias",
    "fc1.weight",
    "fc1.bias",
    "fc2.weight",
    "fc2.bias",
    "fc3.weight",
    "fc3.bias",
    "fc4.weight",
    "fc4.bias",
    "ffn_layer_norm.weight",
    "ffn_layer_norm.bias",
    "final_layer_norm.weight",
    "final_layer_norm.bias",
]

XLMR_HF_EMBED = [
    "roberta.embeddings.word_embeddings.weight",
    "roberta.embeddings.position_embeddings.weight",
    "roberta.embeddings.token_type_embeddings.weight",
    "roberta.embeddings.LayerNorm.weight",
    "roberta.embeddings.LayerNorm.bias",
]
XLMR_HF_LAYER = [
    "attention.self.query.weight",
    "attention.self.query.bias",
    "attention.self.key.weight",
    "attention.self.key.bias",
    "attention.self.value.weight",
    "attention.self.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "intermediate.dense.weight",
    "intermediate.dense.bias",
    "output.dense.weight",
    "output.dense.bias",
    "output.LayerNorm.weight",
    "output.LayerNorm.bias",
]
XLMR_HF_OTHER = [
    "roberta.pooler.dense.weight",
    "roberta.pooler.dense.bias",
    "lm_head.bias",
    "lm_head.dense.weight",
    "lm_head.dense.bias",
    "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias",
    "lm_head.decoder.weight",
]


def _shape(name: str, d: int, ffn: int, vocab: int, pos: int) -> tuple[int, ...]:
    if name.endswith("version"):
        return (1,)
    if "embed_tokens" in name or "output_projection" in name:
        return (vocab, d)
    if "embed_positions" in name:
        return (pos, d)
    leaf = name.split(".")[-2] if name.endswith((".weight", ".bias")) else ""
    is_w = name.endswith(".weight")
    if leaf in ("fc1", "fc3"):
        return (ffn, d) if is_w else (ffn,)
    if leaf in ("fc2", "fc4"):
        return (d, ffn) if is_w else (d,)
    if leaf.endswith("proj"):
        return (d, d) if is_w else (d,)
    return (d,)  # layer norms


def deltalm_pretrained(
    d: int = 768, ffn: int = 3072, vocab: int = 250104, pos: int = 514, enc: int = 12, dec: int = 6
) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for side in ("tgt_embedding", "src_embedding"):
        for k in DELTALM_PRETRAINED_EMBED:
            out[f"{side}.{k}"] = _shape(k, d, ffn, vocab, pos)
    for i in range(enc):
        for k in DELTALM_PRETRAINED_ENC_LAYER:
            out[f"encoder.layers.{i}.{k}"] = _shape(k.replace("ffn.", ""), d, ffn, vocab, pos)
    for i in range(dec):
        for k in DELTALM_PRETRAINED_DEC_LAYER:
            kk = k.replace("ffn_1.fc1", "fc3").replace("ffn_1.fc2", "fc4").replace("ffn_2.", "")
            out[f"decoder.layers.{i}.{k}"] = _shape(kk, d, ffn, vocab, pos)
    return out


def deltalm_finetuned(
    d: int = 768, ffn: int = 3072, vocab: int = 250001, pos: int = 514, enc: int = 12, dec: int = 6
) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for k in DELTALM_FT_EMBED:
        out[f"encoder.{k}"] = _shape(k, d, ffn, vocab, pos)
    for i in range(enc):
        for k in DELTALM_FT_ENC_LAYER:
            out[f"encoder.layers.{i}.{k}"] = _shape(k, d, ffn, vocab, pos)
    for k in DELTALM_FT_EMBED:
        out[f"decoder.{k}"] = _shape(k, d, ffn, vocab, pos)
    for i in range(dec):
        for k in DELTALM_FT_DEC_LAYER:
            out[f"decoder.layers.{i}.{k}"] = _shape(k, d, ffn, vocab, pos)
    out["decoder.output_projection.weight"] = (vocab, d)
    return out


def xlmr_hf(d: int = 768, ffn: int = 3072, vocab: int = 250002, pos: int = 514, layers: int = 12) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    shapes = {"word_embeddings": (vocab, d), "position_embeddings": (pos, d), "token_type_embeddings": (1, d)}
    for k in XLMR_HF_EMBED:
        out[k] = shapes.get(k.split(".")[2], (d,))
    for i in range(layers):
        for k in XLMR_HF_LAYER:
            w = k.endswith("weight")
            if k.startswith("intermediate"):
                s = (ffn, d) if w else (ffn,)
            elif k.startswith("output.dense"):
                s = (d, ffn) if w else (d,)
            elif "LayerNorm" in k:
                s = (d,)
            else:
                s = (d, d) if w else (d,)
            out[f"roberta.encoder.layer.{i}.{k}"] = s
    for k in XLMR_HF_OTHER:
        out[k] = {"lm_head.bias": (vocab,), "lm_head.decoder.weight": (vocab, d)}.get(
            k, (d, d) if k.endswith("dense.weight") else (d,)
        )
    return out
