"""Which engine a serving replica generates with: raypress's own (engine.core, built for CPUs) or vLLM (the engine
of GPU clusters, behind the same interface: engine.vllm_server), chosen by the application arg ``engine``. The routes,
their checks and the Batch API are the same on both."""

from __future__ import annotations

import logging

from compress import models
from engine.interface import EngineClient

log = logging.getLogger("ray.serve")
ENGINES = ("raypress", "vllm")
RAYPRESS_ONLY = ("max_batch_tokens", "block_size", "kv_cache_tokens", "prefix_caching")  # settings vLLM does not take


def warn_unused(cls: type, values: dict) -> None:
    """engine: vllm: say (not silently drop) which of raypress's engine settings (RAYPRESS_ONLY; ``values``) differ
    from their defaults in the signature of ``cls``'s constructor, and so go unused. (Serve's ingress wraps the class
    in a subclass taking ``*args``: the defaults are read from the class along the MRO that declares them.)"""
    import inspect

    defaults = next(p for p in (inspect.signature(c.__init__).parameters for c in cls.__mro__)
                    if all(k in p for k in RAYPRESS_ONLY))
    changed = sorted(k for k in RAYPRESS_ONLY if values[k] != defaults[k].default)
    if changed:
        log.warning("raypress: %s apply to raypress's engine only; vLLM sizes its own batches and cache "
                    "(VLLM_CPU_KVCACHE_SPACE on a CPU, gpu_memory_utilization on a GPU)", ", ".join(changed))


def config_of(model: str):
    """A model's config without its weights, with an artifact's manifest where it has one (the served name)."""
    from transformers import AutoConfig

    from compress import artifact

    path = models.resolve(model)
    config = AutoConfig.from_pretrained(path)
    if (path / models.MANIFEST).exists():
        config.raypress_manifest = artifact.read_manifest(path)
    return config


def vllm_engine(model: str, max_num_seqs: int, max_model_len: int, tensor_parallel_size: int) -> EngineClient:
    """vLLM behind the engine interface (engine.vllm_server), on the model's folder or an artifact's
    compressed-tensors export; on a machine without a GPU, vLLM's CPU backend with what it needs (engine.vllm)."""
    import torch

    from engine.vllm import run_settings
    from engine.vllm_server import AsyncVllmEngine
    from jobs.export import for_vllm

    folder = for_vllm(model)
    settings = run_settings(folder, on_gpu=torch.cuda.is_available())
    return AsyncVllmEngine(folder, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                           tensor_parallel_size=tensor_parallel_size, **settings)
