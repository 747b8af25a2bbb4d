"""The engine's figures in Prometheus' text format, for GET /metrics (one replica's view).

Ray Serve exports its own request metrics (``ray_serve_num_http_requests``, ``ray_serve_http_request_latency_ms``,
``ray_serve_replica_processing_queries``, ...) for every replica on Ray's metrics port; this page adds what only the
engine knows: running and waiting requests, tokens, time to first token and step time, the KV cache's blocks, the
prefix cache's hits and preemptions.
"""

from __future__ import annotations

from engine.metrics import PHASES, EngineStats, Histogram


def prometheus_text(stats: EngineStats, model: str) -> str:
    label = f'model="{model}"'
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, value: float) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{{{label}}} {value}"])

    def histogram(name: str, help_: str, h: Histogram) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} histogram"])
        for bound, count in h.cumulative():
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            lines.append(f'{name}_bucket{{{label},le="{le}"}} {count}')
        lines.extend([f"{name}_sum{{{label}}} {h.sum}", f"{name}_count{{{label}}} {h.count}"])

    metric("raypress_requests_running", "gauge", "Requests running (holding KV blocks).", stats.running)
    metric("raypress_requests_waiting", "gauge", "Requests waiting to start.", stats.waiting)
    metric("raypress_requests_total", "counter", "Requests submitted to the engine.", stats.requests)
    metric("raypress_prompt_tokens_total", "counter", "Prompt tokens prefilled.", stats.prompt_tokens)
    metric("raypress_generation_tokens_total", "counter", "Tokens generated.", stats.generation_tokens)
    metric("raypress_generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
           round(stats.generation_tokens_per_s, 3))
    c = stats.cache
    metric("raypress_kv_blocks", "gauge", f"KV-cache blocks of {c.block_size} positions.", c.blocks)
    metric("raypress_kv_blocks_used", "gauge", "KV-cache blocks held by running requests.", c.blocks - c.free_blocks)
    metric("raypress_kv_blocks_cached", "gauge", "Full KV blocks known to the prefix cache (held or not).",
           c.cached_blocks)
    metric("raypress_prefix_cache_queried_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
           c.prompt_tokens)
    metric("raypress_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
           c.cached_tokens)
    metric("raypress_prefix_cache_hit_rate", "gauge", "Prompt tokens served from the cache / prompt tokens.",
           round(c.hit_rate, 4))
    metric("raypress_preemptions_total", "counter", "Running requests sent back to wait for KV blocks.",
           c.preemptions)
    name = "raypress_step_phase_seconds_total"
    lines.extend([f"# HELP {name} Seconds of engine steps spent in each phase ({', '.join(PHASES)}).",
                  f"# TYPE {name} counter"])
    lines.extend(f'{name}{{{label},phase="{phase}"}} {seconds}' for phase, seconds in stats.phase_s.items())
    histogram("raypress_time_to_first_token_seconds", "Time from arrival to the first token.", stats.ttft_s)
    histogram("raypress_step_seconds", "Time of one engine step (prompt chunks and one decode forward).",
              stats.step_s)
    histogram("raypress_decode_batch_size", "Sequences in each decode forward.", stats.decode_batch)
    return "\n".join(lines) + "\n"
