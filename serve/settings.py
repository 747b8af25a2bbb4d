"""The serving application's args: the ones `serve run` and the Serve YAML may give (strings become numbers),
where the API key comes from, and the model id a server answers with."""

from __future__ import annotations

import os
from pathlib import Path


def served_name(model: str, config) -> str:
    """The model id a server answers with: an artifact's base model and spec ("smollm2-135m-int8", not the folder
    name "chosen" of a sweep's choice), else the folder's or built-in's name."""
    manifest = getattr(config, "raypress_manifest", None) or {}
    base = (manifest.get("base_model") or {}).get("id")
    if not base:
        return os.path.basename(os.path.normpath(str(model)))
    base = os.path.basename(os.path.normpath(base)) if os.path.isabs(base) else base
    spec = manifest.get("spec", "base")
    return base if spec == "base" else f"{base}-{spec}"


BUILD_ARGS = {"model", "model_name", "max_num_seqs", "max_model_len", "max_batch_tokens", "block_size",
              "kv_cache_tokens", "prefix_caching", "max_batch_size",
              "batch_wait_timeout_s", "default_max_tokens", "num_threads", "api_key_file", "batch_storage", "batch_db",
              "batch_actors", "batch_cpus_per_actor", "batch_max_requests", "batch_max_num_seqs", "batch_jobs_address",
              "batch_poll_s",
              "max_items_per_request", "max_request_bytes", "allow_unknown_fields", "engine", "tensor_parallel_size",
              "batch_gpus_per_actor", "batch_engine"}
INT_ARGS = ("max_num_seqs", "max_model_len", "max_batch_tokens", "block_size", "kv_cache_tokens", "max_batch_size",
            "default_max_tokens", "num_threads", "batch_actors", "batch_max_requests", "batch_max_num_seqs",
            "max_items_per_request", "max_request_bytes", "tensor_parallel_size")
FLOAT_ARGS = ("batch_wait_timeout_s", "batch_cpus_per_actor", "batch_poll_s", "batch_gpus_per_actor")
BOOL_ARGS = ("prefix_caching", "allow_unknown_fields")
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def server_args(args: dict | None) -> dict:
    """Check and convert application args (strings from `serve run ... key=value`) into ModelServer's arguments.
    The API key comes from RAYPRESS_API_KEY where the application is built, or from the file ``api_key_file``
    names: never from an application arg, which `serve config` and the dashboard show."""
    args = dict(args or {})
    if "api_key" in args:
        raise ValueError("api_key is not an application arg (Serve shows those in `serve config`): set "
                         "RAYPRESS_API_KEY where the application is built, or give api_key_file, a file holding it")
    unknown = set(args) - BUILD_ARGS
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; allowed: {sorted(BUILD_ARGS)}")
    key_file = args.pop("api_key_file", None)
    args["api_key"] = os.environ.get("RAYPRESS_API_KEY") or None
    if key_file:
        args["api_key"] = Path(key_file).expanduser().read_text().strip() or None
        if not args["api_key"]:
            raise ValueError(f"api_key_file {key_file!r} is empty")
    for key in INT_ARGS:
        if args.get(key) is not None:
            args[key] = int(args[key])
    for key in FLOAT_ARGS:
        if args.get(key) is not None:
            args[key] = float(args[key])
    for key in BOOL_ARGS:
        value = args.get(key)
        if isinstance(value, str):
            if value.lower() not in _BOOLS:
                raise ValueError(f"{key}={value!r}: expected true or false")
            args[key] = _BOOLS[value.lower()]
    return args
