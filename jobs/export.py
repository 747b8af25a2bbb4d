"""Export a model or artifact to a format other engines load.

    python -m jobs.export artifacts/sweep-smollm2/chosen --format compressed-tensors --out exports/smollm2-ct
    vllm serve exports/smollm2-ct

compressed-tensors (the format of llm-compressor; vLLM and Hugging Face transformers with the compressed-tensors
package load it): int8 -> W8A16 (weights int8 per channel), int8-dynamic -> W8A8 (int8 activations per token at
run time), int4-gN and gptq-int4-gN -> W4A16 with zero points, int4s-gN and gptq-int4s-gN -> W4A16 symmetric;
pruned and distilled variants and float models -> plain dense checkpoints. int4m-gN (groups offset by their float
minimum) are refused: compress with the int4 or int4s forms to export. The export writes config.json (with
quantization_config), model.safetensors, the tokenizer and generation config, and loads back in raypress with
``models.load(OUT)``.

gguf (llama.cpp, ollama; Llama-family models): int8 -> Q8_0, int4-gN and int4m-gN -> Q4_1, int4s-gN -> Q4_0 (the
same grids; scales in float16), float layers -> F32 (or F16: --gguf-float f16), one file OUT/NAME-SPEC.gguf with
the tokenizer and chat template.
"""

from __future__ import annotations

import fcntl
import json
import logging
import sys
import time
from pathlib import Path

from compress import artifact, ctensors, files, gguf_export, models
from compress.ctensors import ExportError

log = logging.getLogger("jobs.export")

FORMATS = ("compressed-tensors", "gguf")


def export(model: str, out: str | Path, format: str = "compressed-tensors", gguf_float: str = "f32") -> Path:
    """Write ``model`` (built-in, folder or artifact) to ``out`` in ``format``; returns the folder. ``gguf_float``:
    the GGUF type of float matrices (f32 or f16)."""
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: expected one of {FORMATS}")
    if gguf_float not in gguf_export.FLOAT_TYPES:
        raise ValueError(f"--gguf-float {gguf_float!r}: expected one of {gguf_export.FLOAT_TYPES}")
    from safetensors.torch import save_file

    path = models.resolve(model)
    manifest = artifact.read_manifest(path) if (path / models.MANIFEST).exists() else {}
    spec = manifest.get("spec", "base")
    loaded = models.load(path, device="cpu")
    out = Path(out)
    if format == "gguf":
        base = (manifest.get("base_model") or {}).get("id") or path.name
        name = f"{Path(str(base)).name}-{spec}".replace("+", "-")
        with files.new_folder(out) as tmp:
            gguf_export.write(loaded.model, loaded.tokenizer, tmp / f"{name}.gguf", name, gguf_float)
        return out
    state, quant = ctensors.export_state(loaded.model, spec)
    with files.new_folder(out) as tmp:
        config = loaded.model.config
        config.__dict__.pop("raypress_manifest", None)
        config.__dict__.pop("raypress_pooling", None)
        config.save_pretrained(tmp)
        if quant is not None:
            saved = json.loads((tmp / "config.json").read_text())
            saved["quantization_config"] = quant
            (tmp / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
        generation = getattr(loaded.model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
    return out


def for_vllm(model: str) -> Path:
    """What vLLM loads for ``model``: a plain model folder as it is; a raypress artifact as its compressed-tensors
    export, written beside it (ARTIFACT-compressed-tensors, what ``export_choice`` writes for a sweep's chosen) and
    reused while the artifact's manifest is the one it was made from."""
    import hashlib

    path = models.resolve(model)
    if not (path / models.MANIFEST).exists():
        return path
    digest = hashlib.sha256((path / models.MANIFEST).read_bytes()).hexdigest()
    out = path.with_name(f"{path.name}-compressed-tensors")
    marker = out / "raypress-source.json"
    with open(path.with_name(f".{path.name}-compressed-tensors.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the actors of one node: one exports, the others wait and reuse it
        if marker.exists() and json.loads(marker.read_text()).get("manifest_sha256") == digest:
            return out
        log.info("exporting %s as compressed-tensors for vLLM -> %s", path, out)
        export(str(path), out, "compressed-tensors")
        marker.write_text(json.dumps({"artifact": str(path), "manifest_sha256": digest}) + "\n")
    return out


def export_choice(out: Path, spec: str | None, formats: list[str]) -> str:
    """Export a sweep's chosen variant (OUT/chosen, of ``spec``) to OUT/chosen-FORMAT for each format; returns what
    to add to the sweep's summary line. A variant a format cannot hold is reported, not fatal: the sweep stands."""
    said = ""
    for fmt in formats if spec else []:
        try:
            said += f"; {fmt}: {export(str(out / 'chosen'), out / f'chosen-{fmt}', fmt)}"
        except ExportError as e:
            log.error("export %s of %s: %s", fmt, spec, e)
            said += f"; {fmt}: not exported ({e})"
    return said


def main(model: str, out: str | None = None, format: str = "compressed-tensors", gguf_float: str = "f32") -> int:
    """Export a model or raypress artifact (e.g. a sweep's chosen/) for other engines.

    Args:
        model: built-in name, model folder or raypress artifact.
        out: folder to write (replaced if it exists); default exports/NAME-FORMAT.
        format: compressed-tensors (vLLM, HF transformers, llm-compressor's format) or gguf (llama.cpp).
        gguf_float: GGUF only: f32 or f16 for float matrices (a float or distilled model's, layers a spec kept
            float); norms stay f32.
    """
    start = time.perf_counter()
    out = out or f"exports/{Path(str(model).rstrip('/')).name}-{format}"
    path = export(model, out, format, gguf_float)  # a variant the format cannot hold: ExportError, exit 2 with why
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"exported {model} as {format} -> {path} ({size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    from jobs import export as job
    from jobs.cli import run

    sys.exit(run(job.main))
