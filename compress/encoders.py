"""Sentence encoders: how one pools token states into a sentence vector (the sentence-transformers files beside
the weights), and ``encode``, which does it.

    vectors = encode(model, tokenizer, ["A sentence.", "Another one."])   # [2, D] float32, on CPU
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig

# sentence-transformers files that say how an encoder pools; copied along with the model.
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json")


def read_pooling(path: Path) -> dict:
    """How a sentence encoder turns token states into one vector (sentence-transformers files, else mean)."""
    pooling = {"mode": "mean", "normalize": False}
    pool_file = Path(path) / "1_Pooling" / "config.json"
    if pool_file.exists():
        cfg = json.loads(pool_file.read_text())
        if cfg.get("pooling_mode_cls_token"):
            pooling["mode"] = "cls"
        elif cfg.get("pooling_mode_max_tokens"):
            pooling["mode"] = "max"
    modules_file = Path(path) / "modules.json"
    if modules_file.exists():
        modules = json.loads(modules_file.read_text())
        pooling["normalize"] = any(m.get("type", "").endswith("Normalize") for m in modules)
    st_file = Path(path) / "sentence_bert_config.json"
    if st_file.exists() and json.loads(st_file.read_text()).get("max_seq_length"):
        pooling["max_length"] = int(json.loads(st_file.read_text())["max_seq_length"])
    cfg_pooling = getattr(AutoConfig.from_pretrained(path), "raypress_pooling", None)
    return {**pooling, **(cfg_pooling or {})}


def input_limit(config) -> int:
    """Tokens one input of an encoder may have: its sentence-transformers max_seq_length where it has one (256 for
    all-MiniLM-L6-v2), else its position embeddings. Serving and batch jobs refuse longer inputs."""
    pooling = getattr(config, "raypress_pooling", None) or {}
    return int(pooling.get("max_length") or getattr(config, "max_position_embeddings", None) or 512)


def copy_sentence_transformers_files(src: Path, dst: Path) -> None:
    for rel in ST_FILES:
        if (Path(src) / rel).exists():
            (Path(dst) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(src) / rel, Path(dst) / rel)


@torch.inference_mode()
def encode(model, tokenizer, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings [n, D] pooled as the encoder's sentence-transformers config says (float32, on CPU).
    Texts longer than ``input_limit`` are cut to it, as sentence-transformers does; the serving app and the batch
    job refuse them before they get here."""
    pooling = getattr(model.config, "raypress_pooling", None) or {"mode": "mean", "normalize": False}
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=input_limit(model.config),
            return_tensors="pt",
        ).to(device)
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        if pooling["mode"] == "cls":
            emb = hidden[:, 0]
        elif pooling["mode"] == "max":
            emb = hidden.masked_fill(mask == 0, -1e9).amax(dim=1)
        else:
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        if pooling.get("normalize"):
            emb = torch.nn.functional.normalize(emb, dim=-1)
        out.append(emb.cpu())
    return torch.cat(out) if out else torch.empty(0)
