"""The GPU paths, end to end, in a few minutes on one GPU: a table with pass or fail per line.

    python bench/gpu_smoke.py                  # on the GPU, in bf16 (the device's default)
    python bench/gpu_smoke.py --device cpu     # the same lines on the CPU in float32 (a check of the script)
    python bench/gpu_smoke.py --only vllm      # the lines whose name holds "vllm"

Loads the built-ins (SmolLM2-135M, all-MiniLM-L6-v2), compresses each with int8, int4-g64, GPTQ, 2:4 pruning and a
few distillation steps, saves and reloads the artifact, generates through the engine (the path serving and batch
jobs use) and embeds; each line records what it measured or the error it hit. The vLLM lines (where vLLM is
installed) run each compressed-tensors export (W8A8, W4A16, W8A16, and the float model) on vLLM and count how often
its top token equals raypress's greedy token on the same artifact; on a CPU, vLLM's CPU backend refuses up front
what it has no kernel for, and the line says so. Exit status 1 when any line failed.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from compress import artifact, data, distill, evaluate, models, specs  # noqa: E402
from compress.cpu import cpu_description  # noqa: E402
from engine.core import Engine  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402

CAUSAL_SPECS = ["base", "int8", "int8-dynamic", "int4-g64", "gptq-int4-g64", "prune-2:4", "wanda-2:4+int8",
                specs.Spec((distill.DistillConfig(layers=20, tokens=4096),))]  # a few distillation steps
ENCODER_SPECS = ["base", "int8", "int4-g32", "prune-2:4"]
VLLM_SPECS = ["base", "int8-dynamic", "int4s-g64", "int8"]  # float, W8A8, W4A16, W8A16 (compressed-tensors)


def check_causal(loaded, spec: str | specs.Spec, blocks, ref, out: Path) -> str:
    model = copy.deepcopy(loaded.model)
    specs.apply_(model, spec, blocks=blocks)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    quality = evaluate.quality(model, loaded.tokenizer, loaded.kind, ref)
    path = artifact.save(model, loaded.tokenizer, out / str(spec).replace(":", "-"), {"spec": str(spec)})
    again = models.load(path, device=next(model.parameters()).device)
    engine = Engine(again.model, again.tokenizer, max_num_seqs=4, max_model_len=256)
    prompts = [data.prompt_ids(again.tokenizer, data.chat_prompt(again.tokenizer, p), templated=True)
               for p in data.BUILTIN_PROMPTS[:4]]  # an instruction-tuned model: its chat template
    start = time.perf_counter()
    results = engine.generate(prompts, [SamplingParams(max_tokens=32)] * 4)
    seconds = time.perf_counter() - start
    if any(r.error for r in results) or not any(r.token_ids for r in results):
        raise RuntimeError(f"generation failed: errors {[r.error for r in results]}, "
                           f"tokens {[len(r.token_ids) for r in results]}")
    tokens = sum(len(r.token_ids) for r in results)
    return (f"{dtype}, ppl {quality['ppl']:.2f}, top-1 {quality['top1_agreement']:.3f}, reloaded, "
            f"{tokens / seconds:.0f} tok/s at 4 sequences")


def check_vllm(loaded, spec: str, out: Path, device: torch.device) -> str:
    """vLLM on the artifact's compressed-tensors export: its top token on raypress's greedy answers (teacher-forced,
    so one near-tie does not end the comparison) and its decode speed at 4 sequences."""
    from engine import vllm
    from jobs.export import for_vllm

    model = copy.deepcopy(loaded.model)
    specs.apply_(model, spec)
    path = artifact.save(model, loaded.tokenizer, out / f"vllm-{spec}", {"spec": spec})
    folder = for_vllm(str(path))
    try:
        settings = vllm.run_settings(folder, on_gpu=device.type == "cuda")
    except ValueError as e:  # vLLM's CPU backend has no kernel for it: refused before any engine starts
        return f"refused up front, as it must be on this CPU: {str(e)[:100]}"
    again = models.load(path, device=device)
    prompts = [data.prompt_ids(again.tokenizer, data.chat_prompt(again.tokenizer, p), templated=True)
               for p in data.BUILTIN_PROMPTS[:4]]
    ours = Engine(again.model, again.tokenizer, max_num_seqs=4, max_model_len=256).generate(
        prompts, [SamplingParams(max_tokens=32, temperature=0.0)] * 4)
    room = {"gpu_memory_utilization": 0.4} if device.type == "cuda" else {}  # raypress's models hold the rest
    engine = vllm.VllmEngine(folder, max_num_seqs=4, max_model_len=256, **room, **settings)
    try:
        start = time.perf_counter()
        theirs = engine.generate(prompts, [SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)] * 4)
        seconds = time.perf_counter() - start
        scored = engine.generate([p + o.token_ids for p, o in zip(prompts, ours, strict=True)],
                                 [SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)] * 4)
    finally:
        engine.shutdown()
    same = sum(s.prompt_logprobs[len(p) + k].top[0][0] == t for p, o, s in zip(prompts, ours, scored, strict=True)
               for k, t in enumerate(o.token_ids))
    total = sum(len(o.token_ids) for o in ours)
    if same < 0.85 * total:
        raise RuntimeError(f"vLLM's top token equals raypress's greedy token at only {same}/{total} positions")
    tokens = sum(len(t.token_ids) for t in theirs)
    return (f"{settings.get('dtype', 'auto' if device.type == 'cuda' else 'float32')}, top-1 = raypress's at "
            f"{same}/{total}, {tokens / seconds:.0f} tok/s at 4 sequences")


def check_encoder(loaded, spec: str, ref, out: Path) -> str:
    model = copy.deepcopy(loaded.model)
    specs.apply_(model, spec)
    quality = evaluate.quality(model, loaded.tokenizer, loaded.kind, ref)
    path = artifact.save(model, loaded.tokenizer, out / f"minilm-{spec.replace(':', '-')}", {"spec": spec})
    again = models.load(path, device=next(model.parameters()).device)
    vectors = models.encode(again.model, again.tokenizer, list(data.BUILTIN_PROMPTS[:8]))
    if not torch.isfinite(vectors).all():
        raise RuntimeError("non-finite embeddings")
    return f"cosine to base {quality['cosine_to_base']:.4f}, reloaded, {tuple(vectors.shape)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default="", help="run the lines whose name holds this text (e.g. vllm, minilm)")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    print(f"device: {where}; torch {torch.__version__}", flush=True)
    rows, out = [], Path(tempfile.mkdtemp(prefix="raypress-gpu-smoke-"))

    def line(name: str, fn) -> None:
        if args.only not in name:
            return
        start = time.perf_counter()
        try:
            rows.append((name, "pass", fn()))
        except Exception as e:  # every line runs; the table says which failed and why
            traceback.print_exc()
            rows.append((name, "FAIL", f"{type(e).__name__}: {str(e)[:160]}"))
        print(f"{rows[-1][1]:<5} {name:<34} {time.perf_counter() - start:6.1f} s  {rows[-1][2]}", flush=True)

    smol = models.load("smollm2-135m", device=device)
    texts = evaluate.default_eval_texts(smol.model, smol.tokenizer, smol.kind)[:8]
    ref = evaluate.reference(smol.model, smol.tokenizer, smol.kind, texts, 128, 4)
    blocks = data.calibration_blocks(smol.model, smol.tokenizer, smol.kind, n_blocks=16)
    for spec in CAUSAL_SPECS:
        line(f"smollm2-135m {spec}", lambda s=spec: check_causal(smol, s, blocks, ref, out))
    if importlib.util.find_spec("vllm") is None:
        print("vLLM is not installed here: no vLLM lines (pip install vllm on a GPU node; make venv-vllm on a CPU)")
    else:
        for spec in VLLM_SPECS:
            line(f"smollm2-135m {spec} on vllm", lambda s=spec: check_vllm(smol, s, out, device))
    mini = models.load("minilm-l6", device=device)
    mref = evaluate.reference(mini.model, mini.tokenizer, mini.kind, list(data.BUILTIN_PROMPTS), 64, 4)
    for spec in ENCODER_SPECS:
        line(f"minilm-l6 {spec}", lambda s=spec: check_encoder(mini, s, mref, out))
    failed = sum(status == "FAIL" for _, status, _ in rows)
    print(f"\n{len(rows) - failed} passed, {failed} failed ({where}); artifacts in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
