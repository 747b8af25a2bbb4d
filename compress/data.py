"""Text for calibration and evaluation.

By default the base model writes its own text from a built-in list of varied prompts, so nothing has to be
downloaded. Users may give a text file (one document per blank-line-separated paragraph), or a parquet, jsonl or
csv file with a text column.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from compress.hf import CAUSAL

log = logging.getLogger(__name__)

BUILTIN_PROMPTS = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What were the main causes of the French Revolution?",
    "Describe the water cycle to a ten-year-old.",
    "Give three tips for writing clear emails at work.",
    "How does a bill become a law in the United States?",
    "Summarize the plot of Romeo and Juliet.",
    "What is photosynthesis and why does it matter?",
    "Write a recipe for a simple vegetable soup.",
    "Explain the difference between a virus and a bacterium.",
    "Describe a busy market in a large city in the morning.",
    "What should someone consider before adopting a dog?",
    "Explain how compound interest works with an example.",
    "Write a letter thanking a teacher who made a difference.",
    "Why is the sky blue?",
    "Describe how the internet sends a message from one computer to another.",
    "What are the rules of chess for how each piece moves?",
    "Tell me about the history of the printing press.",
    "How do vaccines train the immune system?",
    "Write a poem about autumn leaves.",
    "Explain what a black hole is.",
    "List the planets of the solar system and one fact about each.",
    "How can a small town attract more visitors?",
    "Describe the life cycle of a butterfly.",
    "What makes a good team leader?",
    "Explain how a bicycle stays upright while moving.",
    "Write a product description for a waterproof backpack.",
    "What happened during the first moon landing?",
    "How do earthquakes happen?",
    "Explain the basics of supply and demand.",
    "Describe a walk through a forest after rain.",
    "What are the benefits of learning a second language?",
]


def read_texts(path: str | os.PathLike, column: str = "text", limit: int | None = None) -> list[str]:
    """Read documents from a .txt (paragraphs), .jsonl, .json, .parquet or .csv file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md", ".raw"):
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
        texts = [p for p in paragraphs if p and not p.startswith("=")]  # skip wikitext-style headings
    elif suffix in (".jsonl", ".json"):
        texts = [_column(row, column, where) for where, row in _json_rows(path.read_text(encoding="utf-8"), path)]
    elif suffix in (".parquet", ".csv"):
        import pyarrow.csv
        import pyarrow.parquet

        table = pyarrow.parquet.read_table(path) if suffix == ".parquet" else pyarrow.csv.read_csv(path)
        if column not in table.column_names:
            raise ValueError(f"{str(path)!r} has no column {column!r}; columns: {table.column_names}")
        texts = [t for t in table.column(column).to_pylist() if t]
    else:
        raise ValueError(f"{str(path)!r}: unsupported text format {suffix!r}; use .txt, .jsonl, .parquet or .csv")
    if not texts:
        raise ValueError(f"{str(path)!r} holds no text")
    return texts[:limit] if limit else texts


def _json_rows(text: str, path: Path) -> list[tuple[str, object]]:
    """(where, value) of each row of a JSON array or of JSON lines, whichever the file holds."""
    if text.lstrip().startswith("["):
        try:
            return [(f"{str(path)!r} element {k}", v) for k, v in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(path)!r} is not a valid JSON array: {e}") from e
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{str(path)!r} line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{str(path)!r} line {n} is not JSON: {e}") from e
    return rows


def _column(row, column: str, where: str) -> str:
    """A row's text: the ``column`` field of an object, or the row itself when it is a string."""
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise ValueError(f"{where} is a JSON {type(row).__name__}, not an object or a string")
    if not isinstance(row.get(column), str):
        raise ValueError(f"{where} has no text field {column!r} (fields: {sorted(row)})")
    return row[column]


@torch.inference_mode()
def generated_texts(model, tokenizer, n: int = 16, max_new_tokens: int = 96, seed: int = 0) -> list[str]:
    """Text the causal model writes itself from the built-in prompts (sampled, fixed seed): calibration data that
    needs no download."""
    prompts = [BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)] for i in range(n)]
    torch.manual_seed(seed)
    texts = []
    for start in range(0, n, 8):
        batch = [chat_prompt(tokenizer, p) for p in prompts[start : start + 8]]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_p=0.95,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        answers = tokenizer.batch_decode(new, skip_special_tokens=True)
        texts += [f"{p}\n{a.strip()}" for p, a in zip(prompts[start : start + 8], answers, strict=True)]
    return texts


def chat_text(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """OpenAI-style messages (and tools, for a template that renders them) through the model's chat template, ending
    where the assistant's answer starts."""
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


def chat_prompt(tokenizer, user_text: str) -> str:
    """One user message in the chat template, or the text as it is for a model without one."""
    if getattr(tokenizer, "chat_template", None):
        return chat_text(tokenizer, [{"role": "user", "content": user_text}])
    return user_text


def prompt_ids(tokenizer, text: str, templated: bool) -> list[int]:
    """Token ids of a prompt. Raw text gets the special tokens the tokenizer adds by default (BOS for Llama and
    Mistral tokenizers, none for SmolLM2's); text made by the chat template already holds its own."""
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


def token_blocks(tokenizer, texts: list[str], seq_len: int, n_blocks: int) -> torch.Tensor:
    """Concatenate the texts' tokens and cut ``n_blocks`` blocks of ``seq_len`` tokens: [n_blocks, seq_len]."""
    sep = tokenizer.eos_token or "\n\n"
    ids = tokenizer(sep.join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    available = ids.numel() // seq_len
    if available == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one block of {seq_len}")
    if available < n_blocks:
        log.warning("text gives %d blocks of %d tokens, fewer than the %d asked for", available, seq_len, n_blocks)
    n = min(n_blocks, available)
    return ids[: n * seq_len].reshape(n, seq_len)


def default_calibration_texts(model, tokenizer, kind: str) -> list[str]:
    """Calibration text that needs no download: what the causal model writes itself from the built-in prompts
    (encoders: the built-in prompts)."""
    return generated_texts(model, tokenizer, n=32) if kind == CAUSAL else list(BUILTIN_PROMPTS) * 4


def calibration_blocks(model, tokenizer, kind: str, texts: list[str] | None = None, n_blocks: int = 32) -> torch.Tensor:
    """Token blocks for calibration: from ``texts``, or by default ``default_calibration_texts``."""
    if texts is None:
        texts = default_calibration_texts(model, tokenizer, kind)
    seq_len = 256 if kind == CAUSAL else 64
    return token_blocks(tokenizer, texts, seq_len, n_blocks)
