"""Sweep compression specs on Ray: measure every variant, draw the Pareto fronts, pick one to serve.

    python -m jobs.sweep sweeps/smollm2.yaml --out artifacts/sweep-smollm2
    ray job submit --working-dir . -- python -m jobs.sweep sweeps/minilm.yaml --out /tmp/sweep-minilm

A pool of trial actors each loads the base model once and takes spec after spec: compress a copy, evaluate it
against the base, save the artifact to the store (OUT/artifacts, or --store: any URI every node reaches, for
clusters whose nodes do not share a disk). Each finished trial is written to OUT/results.parquet at once, so a rerun
skips what is done and a killed sweep resumes. Speed is then measured one variant at a time, with the machine to
itself, on the engine that will serve it (--engine: raypress's, or vLLM on GPU nodes). OUT gets report.md,
pareto.png (+ pareto.csv), chosen/ (the best variant within budget) and serve.yaml.
Exit code 0: a variant was chosen; 3: none met the budget; 2: bad config.

Config (YAML):
    model: smollm2-135m            # built-in, folder, artifact or hub id
    eval_data: null                # text file; default: text the base model writes itself
    calib_data: null               # for gptq / wanda / distill; default likewise (another sample)
    specs: [base, int8, "int4-g{g}"]
    grid: {g: [32, 128]}           # placeholders in specs expand over these values
    budget: {max_ppl_increase: 0.02, min_top1_agreement: 0.95}   # encoders: min_cosine, min_neighbour_overlap
    objective: smallest            # or fastest, or {fastest_under_size: 100MB}
    export: [compressed-tensors]   # also write chosen-FORMAT/ for other engines (see jobs.export)
    checkpoints:                   # variants of the same model compressed elsewhere, measured beside these:
      llmc-w4a16: /models/smollm2-w4a16   # NAME: a compressed-tensors checkpoint (llm-compressor's) or artifact
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml

from compress import artifact, data, evaluate, files, models, specs
from engine import speed
from jobs import auto, export, report, storage
from jobs.placement import warn_if_gpus_idle
from jobs.sweep_config import SweepConfig, load_config

log = logging.getLogger("jobs.sweep")
NO_VARIANT_EXIT = 3


# ---------------------------------------------------------------------------------------------------------------
# Trials


class TrialActor:
    """Holds the base model and its reference once; compresses, evaluates and saves one spec per call."""

    def __init__(self, model: str, eval_texts: list[str], calib_texts: list[str] | None, cfg: dict, store: str):
        import torch

        torch.set_grad_enabled(False)
        warn_if_gpus_idle("--gpus-per-actor 1", log)
        self.name, self.store, self.fingerprint = model, store, cfg["fingerprint"]
        self.checkpoints = cfg.get("checkpoints") or {}
        self.budget = cfg.get("budget") or {}
        self.base, self.tokenizer, self.kind = models.load(model)
        self.ref = evaluate.reference(self.base, self.tokenizer, self.kind, eval_texts, cfg["seq_len"],
                                      cfg["eval_blocks"])
        self.calib = None
        if calib_texts:
            seq_len = cfg["seq_len"] if self.kind == models.CAUSAL else 64
            self.calib = data.token_blocks(self.tokenizer, calib_texts, seq_len, cfg["calib_blocks"])
        self.digest = artifact.weight_digest(self.base)

    def run(self, spec: str) -> dict:
        import copy

        start = time.perf_counter()
        row = {"spec": spec, "error": None, "fingerprint": self.fingerprint}
        try:
            if spec in self.checkpoints:
                return self._checkpoint(spec, row, start)
            if spec in auto.FAMILIES:
                row["fingerprint"] = auto.fingerprint(self.fingerprint, self.budget)
                model, made, notes, metrics = auto.find(self.base, self.tokenizer, self.kind, self.ref, self.calib,
                                                        self.budget, spec)
            else:
                model, made = (self.base if spec == "base" else copy.deepcopy(self.base)), spec
                notes = {} if spec == "base" else specs.apply_(model, spec, blocks=self.calib)
                metrics = evaluate.quality(model, self.tokenizer, self.kind, self.ref)
            self._save(row, model, made, notes, metrics)
        except Exception as e:  # a trial that fails is recorded, and the sweep goes on
            log.warning("trial %s failed: %s", spec, traceback.format_exc())
            row["error"] = f"{type(e).__name__}: {e}"
        return self._finish(row, start)

    def _save(self, row: dict, model, spec: str, notes: dict, metrics: dict) -> None:
        manifest = {"spec": spec, "base_model": {"id": self.name, "weight_digest": self.digest},
                    "metrics": metrics, "notes": notes}
        uri = f"{self.store.rstrip('/')}/{_slug(row['spec'])}"
        if "://" in uri:  # saved on this node, then copied to the store every node reads
            with tempfile.TemporaryDirectory(prefix="raypress-trial-") as tmp:
                path = artifact.save(model, self.tokenizer, Path(tmp) / _slug(row["spec"]), manifest)
                size = artifact.weights_bytes(path)
                storage.upload(path, uri)
        else:
            path = artifact.save(model, self.tokenizer, uri, manifest)
            uri, size = str(path), artifact.weights_bytes(path)
        row.update(metrics, artifact=uri, artifact_bytes=size, notes=json.dumps(notes))

    def _checkpoint(self, name: str, row: dict, start: float) -> dict:
        """A variant made elsewhere: loaded (onto raypress's kernels where its scheme has one) and measured against
        the same base; its folder is the row's artifact, as it is."""
        path = self.checkpoints[name]
        model, tokenizer, kind = models.load(path)
        if kind != self.kind or len(tokenizer) != len(self.tokenizer):
            raise ValueError(f"checkpoint {name} ({path}) is not a variant of {self.name}: a {kind} model with "
                             f"{len(tokenizer)} tokens against a {self.kind} model with {len(self.tokenizer)}")
        metrics = evaluate.quality(model, self.tokenizer, self.kind, self.ref)
        row.update(metrics, artifact=path, artifact_bytes=models.weights_bytes(path), notes=json.dumps({}))
        return self._finish(row, start)

    def _finish(self, row: dict, start: float) -> dict:
        row["seconds"] = time.perf_counter() - start
        row["finished_at"] = time.time()
        if self.kind == models.CAUSAL:
            row["base_ppl"] = self.ref.ppl
        return row


def measure_speed(artifact_uri: str, threads: int, engine: str = "raypress") -> dict:
    """Speed of one saved variant, loaded from the store, on ``engine``: raypress's with ``threads`` torch threads,
    or vLLM on the artifact's compressed-tensors export. A variant the engine cannot run here gets a
    ``speed_error`` that says why and which spec runs there (vLLM's CPU backend has no W8A16 kernel)."""
    import torch

    from compress.cpu import cpu_description

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    gpu = torch.cuda.is_available()
    where = {"speed_engine": engine, "speed_device": torch.cuda.get_device_name() if gpu else cpu_description()}
    with storage.local_folder(artifact_uri) as path:
        if engine == "vllm":
            from engine import vllm

            try:  # a variant the export cannot hold (int4m) or vLLM cannot run here: said, not measured
                folder = export.for_vllm(str(path))
                settings = vllm.run_settings(folder, on_gpu=gpu)
            except ValueError as e:
                return {**where, "speed_error": str(e)}
            return {**where, **speed.vllm_speed(folder, settings=settings)}
        model, tokenizer, kind = models.load(path)
    return {**where, **speed.measure(model, tokenizer, kind)}


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", spec.replace("%", "pct"))


# ---------------------------------------------------------------------------------------------------------------
# Results


def fingerprint(cfg: SweepConfig) -> str:
    """What a trial's result depends on besides its spec: the model and the text it is measured on. Budget,
    objective and the spec list may change between runs; a change of these makes earlier results stale."""
    keys = {k: getattr(cfg, k) for k in ("model", "eval_data", "calib_data", "eval_column", "seq_len", "eval_blocks",
                                         "calib_blocks")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def reusable(rows: list[dict], cfg: SweepConfig, retry_failed: bool) -> list[dict]:
    """The earlier rows a rerun keeps: specs still in the config, measured under the same fingerprint, and (with
    ``retry_failed``) not failed. Says what it drops."""
    current = fingerprint(cfg)
    rows = [r for r in rows if r["spec"] in cfg.specs]
    expected = dict.fromkeys(auto.FAMILIES, auto.fingerprint(current, cfg.budget))
    stale = [r["spec"] for r in rows if r.get("fingerprint") != expected.get(r["spec"], current)
             or (r["spec"] in cfg.checkpoints and r.get("artifact") != cfg.checkpoints[r["spec"]])]
    if stale:
        log.warning("the sweep config changed since %d result(s) were written (model, eval/calib data, seq_len, "
                    "block counts, a checkpoint's folder, or the budget for auto): re-running %s", len(stale), stale)
    failed = [r["spec"] for r in rows if r.get("error") and r["spec"] not in stale] if retry_failed else []
    if failed:
        log.info("--retry-failed: re-running %s", failed)
    return [r for r in rows if r["spec"] not in stale and r["spec"] not in failed]


def run_trials(cfg: SweepConfig, out: Path, store: str, rows: list[dict], eval_texts, calib_texts, num_actors: int,
               placement: dict, trial_actor: type = TrialActor) -> list[dict]:
    """Run every spec not yet in ``rows`` on a pool of ``trial_actor`` actors; an actor that dies is replaced, and
    every actor, replacements included, is gone when this returns (the speed phase needs their CPUs and GPUs)."""
    done = {r["spec"] for r in rows}
    todo = [s for s in cfg.specs if s not in done]
    if done:
        log.info("resuming: %d spec(s) already in results.parquet, %d to run", len(done & set(cfg.specs)), len(todo))
    if not todo:
        return rows
    actor_cls = ray.remote(trial_actor).options(**placement, max_restarts=0)
    args = (cfg.model, eval_texts, calib_texts, {"seq_len": cfg.seq_len, "eval_blocks": cfg.eval_blocks,
                                                 "calib_blocks": cfg.calib_blocks, "fingerprint": fingerprint(cfg),
                                                 "checkpoints": cfg.checkpoints, "budget": cfg.budget}, store)
    actors = [actor_cls.remote(*args) for _ in range(min(num_actors, len(todo)))]
    try:
        inflight = {}
        for actor in actors:
            spec = todo.pop(0)
            inflight[actor.run.remote(spec)] = (actor, spec)
        total, finished = len(inflight) + len(todo), 0
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            actor, spec = inflight.pop(ref)
            try:
                row = ray.get(ref)
            except ray.exceptions.RayError as e:  # the actor died (out of memory, killed): record it, replace it
                row = {"spec": spec, "error": f"trial actor died: {type(e).__name__}: {str(e)[:300]}",
                       "finished_at": time.time(), "fingerprint": fingerprint(cfg)}
                actor = None
            rows.append(row)
            report.write_results(out, rows)
            finished += 1
            status = f"error: {row['error']}" if row.get("error") else _summary(row, cfg.kind)
            log.info("[%d/%d] %s (%.0f s): %s", finished, total, spec, row.get("seconds", 0), status)
            if todo:
                if actor is None:  # replaced only while there is work for it
                    actor = actor_cls.remote(*args)
                    actors.append(actor)
                nxt = todo.pop(0)
                inflight[actor.run.remote(nxt)] = (actor, nxt)
    finally:
        for actor in actors:
            ray.kill(actor)
    return rows


def run_speed(cfg: SweepConfig, out: Path, rows: list[dict], placement: dict, engine: str) -> list[dict]:
    """Measure each variant's speed on ``engine`` in turn, alone on the machine, and record it as it finishes
    (again where an earlier run measured it on another engine)."""
    key = report.speed_key(cfg.kind)
    todo = [r for r in rows if not r.get("error") and r["spec"] in cfg.specs
            and (r.get(key) is None or r.get("speed_engine", "raypress") != engine)]
    if not todo:
        return rows
    threads = max(1, int(ray.cluster_resources().get("CPU", 1)) if not placement["num_gpus"] else 4)
    task = ray.remote(measure_speed).options(**placement, max_retries=1)
    for i, row in enumerate(todo, 1):
        for stale in (key, "prefill_tokens_per_s", "decode_tokens_per_s_b8", "speed_error", "speed_device"):
            row.pop(stale, None)
        try:
            row.update(ray.get(task.remote(row["artifact"], min(threads, os.cpu_count() or 1), engine)))
        except ray.exceptions.RayError as e:
            row["error"] = f"speed measurement failed: {str(e)[:300]}"
        report.write_results(out, rows)
        figure = row.get("speed_error") or f"{row.get(key) or float('nan'):.1f}"
        log.info("speed on %s [%d/%d] %s: %s %s", engine, i, len(todo), row["spec"], key, figure)
    return rows


def _summary(row: dict, kind: str) -> str:
    q = report.quality_key(kind)
    return f"{q} {row.get(q, float('nan')):.4g}, {row.get('artifact_bytes', 0) / 1e6:.1f} MB"


# ---------------------------------------------------------------------------------------------------------------
# The choice


def write_choice(out: Path, chosen: dict | None, num_gpus: float = 0) -> None:
    """OUT/chosen (the chosen artifact) and OUT/serve.yaml serving it (from the store, when that is a URI) on the
    engine its speed was measured on, with the trials' GPUs per replica; without a choice, neither."""
    chosen_dir = out / "chosen"
    if chosen is None:
        shutil.rmtree(chosen_dir, ignore_errors=True)
        (out / "serve.yaml").unlink(missing_ok=True)
        return
    with files.new_folder(chosen_dir) as tmp:
        storage.download(chosen["artifact"], tmp)
    where = chosen["artifact"] if "://" in chosen["artifact"] else chosen_dir.resolve()  # a store every node reads
    text = serve_yaml(where, chosen.get("speed_engine") or "raypress", num_gpus)
    storage.write_bytes(*storage.resolve(out / "serve.yaml"), text.encode())


def serve_yaml(model_dir: Path | str, engine: str = "raypress", num_gpus: float = 0) -> str:
    """A Serve config for ``model_dir`` (served as its manifest's base model and spec, e.g. smollm2-135m-int8): the
    driver's OUT/chosen, or the chosen artifact's URI in the store when the sweep has one (replicas on other nodes
    copy it from there)."""
    app = {"name": "raypress", "route_prefix": "/", "import_path": "serve.app:build",
           "args": {"model": str(model_dir), **({"engine": engine} if engine != "raypress" else {})}}
    if num_gpus:
        app["deployments"] = [{"name": "ModelServer", "ray_actor_options": {"num_gpus": num_gpus}}]
    return yaml.safe_dump({"applications": [app]}, sort_keys=False)


def main(
    config: str,
    out: str = "artifacts/sweep",
    store: str | None = None,
    num_actors: int = 2,
    cpus_per_actor: float = 0.5,
    gpus_per_actor: float = 0.0,
    actor_resources: str | None = None,
    retry_failed: bool = False,
    engine: str = "auto",
) -> int:
    """Run a compression sweep: every spec of CONFIG measured against the base; report, Pareto plot, choice.

    Args:
        config: sweep config YAML (see sweeps/smollm2.yaml).
        out: output folder; a rerun with the same folder resumes.
        store: where the trials' artifacts go: a folder or a URI (s3://bucket/sweep, gs://...) that every node of
            the cluster reads and writes; default OUT/artifacts (one machine, or OUT on a shared filesystem).
        num_actors: trial actors in the pool, each holding the base model once.
        cpus_per_actor: CPUs reserved per trial actor (fractional leaves room for Ray's own tasks).
        gpus_per_actor: GPUs per trial actor (fractional to share a GPU between small models).
        actor_resources: JSON of custom Ray resources per trial actor and speed task, to put them on the nodes
            the variants are for, e.g. '{"accelerator": 1}'.
        retry_failed: on a rerun, run again the specs whose trial failed (else they stay recorded as failed).
        engine: what measures the variants' speed, as it will serve them: raypress (its own engine, built for CPUs),
            vllm (each artifact's compressed-tensors export; a variant vLLM cannot run there is left out of the
            choice, saying which spec runs) or auto: vllm when the actors get GPUs and vLLM is installed. serve.yaml
            serves the choice on the same engine.
    """
    start = time.perf_counter()
    cfg = load_config(config)
    from engine import vllm

    engine = vllm.choose(engine, gpus_per_actor, causal=cfg.kind == models.CAUSAL)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("sweep of %s: %d specs %s -> %s (speed on %s)", cfg.model, len(cfg.specs), cfg.specs, out_dir,
             engine if cfg.speed else "-")
    if not ray.is_initialized():
        ray.init(configure_logging=False)
    rows = reusable(report.read_results(out_dir), cfg, retry_failed)
    eval_texts, calib_texts = _texts(cfg, out_dir)
    store = store or str((out_dir / "artifacts").resolve())
    placement = {"num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor,
                 "resources": json.loads(actor_resources) if actor_resources else None}
    rows = run_trials(cfg, out_dir, store, rows, eval_texts, calib_texts, num_actors, placement)
    if cfg.speed:
        rows = run_speed(cfg, out_dir, rows, placement, engine)
    base = next((r for r in rows if r["spec"] == "base" and not r.get("error")), None)
    if base is None:
        raise RuntimeError("the base model itself failed to evaluate; see results.parquet")
    chosen = report.choose(rows, base, cfg.budget, cfg.objective, cfg.kind)
    write_choice(out_dir, chosen, gpus_per_actor)
    exported = export.export_choice(out_dir, chosen["spec"] if chosen else None, cfg.export)
    report.write_report(out_dir, rows, base, cfg.budget, cfg.objective, cfg.kind, cfg.model, chosen)
    report.plot_pareto(out_dir, rows, cfg.kind, chosen)
    pa_rows = [{k: r.get(k) for k in ("spec", "artifact_bytes", report.quality_key(cfg.kind),
                                      report.speed_key(cfg.kind), "error")} for r in rows]
    pq.write_table(pa.Table.from_pylist(pa_rows), out_dir / "pareto.parquet")
    sensitivity = report.sensitivity_table(rows)
    if sensitivity is not None:
        pq.write_table(sensitivity, out_dir / "sensitivity.parquet")
    print((out_dir / "report.md").read_text())
    verdict = f"chosen: {chosen['spec']} -> {out_dir / 'chosen'}" if chosen else "no variant meets the budget"
    print(f"{len(rows)} trials, {sum(bool(r.get('error')) for r in rows)} failed, {time.perf_counter() - start:.0f} s;"
          f" {verdict}; report: {out_dir / 'report.md'}, plot: {out_dir / 'pareto.png'}{exported}")
    return 0 if chosen else NO_VARIANT_EXIT


def _texts(cfg: SweepConfig, out: Path) -> tuple[list[str], list[str] | None]:
    """Eval and calibration text, made once and kept in OUT so that a resumed sweep measures on the same text
    (made again when the config's fingerprint changed)."""
    cache = out / "texts.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("fingerprint") == fingerprint(cfg):
            return saved["eval"], saved["calib"]
    needs_calib = any(s in auto.FAMILIES or specs.needs_calibration(s) for s in cfg.specs if s not in cfg.checkpoints)
    eval_texts = data.read_texts(cfg.eval_data, cfg.eval_column) if cfg.eval_data else None
    calib_texts = data.read_texts(cfg.calib_data, cfg.eval_column) if cfg.calib_data else None
    if eval_texts is None or (needs_calib and calib_texts is None):
        log.info("writing built-in evaluation/calibration text with the base model")
        model, tokenizer, kind = models.load(cfg.model)
        if eval_texts is None:
            eval_texts = evaluate.default_eval_texts(model, tokenizer, kind)
        if needs_calib and calib_texts is None:
            calib_texts = data.default_calibration_texts(model, tokenizer, kind)
        del model
    saved = {"fingerprint": fingerprint(cfg), "eval": eval_texts, "calib": calib_texts}
    storage.write_bytes(*storage.resolve(cache), json.dumps(saved).encode())
    return eval_texts, calib_texts


if __name__ == "__main__":
    # Run the imported module's main, not __main__'s: Ray pickles functions and classes by module name.
    from jobs import sweep as job
    from jobs.cli import run

    sys.exit(run(job.main))
