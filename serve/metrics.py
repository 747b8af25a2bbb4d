"""The engine's figures in Prometheus' text format, for GET /metrics (one replica's view).

Ray Serve exports its own request metrics (``ray_serve_num_http_requests``, ``ray_serve_http_request_latency_ms``,
``ray_serve_replica_processing_queries``, ...) for every replica on Ray's metrics port; this page adds what only the
engine knows: running and waiting requests, tokens, time to first token and step time.
"""

from __future__ import annotations

from engine.metrics import EngineStats, Histogram


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

    metric("raypress_requests_running", "gauge", "Requests holding a KV-cache slot.", stats.running)
    metric("raypress_requests_waiting", "gauge", "Requests waiting for a slot.", stats.waiting)
    metric("raypress_requests_total", "counter", "Requests submitted to the engine.", stats.requests)
    metric("raypress_prompt_tokens_total", "counter", "Prompt tokens prefilled.", stats.prompt_tokens)
    metric("raypress_generation_tokens_total", "counter", "Tokens generated.", stats.generation_tokens)
    metric("raypress_generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
           round(stats.generation_tokens_per_s, 3))
    histogram("raypress_time_to_first_token_seconds", "Time from arrival to the first token.", stats.ttft_s)
    histogram("raypress_step_seconds", "Time of one engine step (prompt chunks and one decode forward).",
              stats.step_s)
    histogram("raypress_decode_batch_size", "Sequences in each decode forward.", stats.decode_batch)
    return "\n".join(lines) + "\n"
