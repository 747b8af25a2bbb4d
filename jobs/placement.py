"""GPUs left idle: a Ray actor asked for none runs on its node's CPU even where the node has GPUs (Ray hides them from
it), silently and many times slower. Each model process calls ``warn_if_gpus_idle`` at start, naming the setting
that gives it GPUs.

    warn_if_gpus_idle("--num-gpus-per-actor 1", log)
"""

from __future__ import annotations

import logging


def idle_gpus_message(node_gpus: float, held_gpus: int, setting: str) -> str | None:
    """The warning for a process holding ``held_gpus`` on a node with ``node_gpus``, or None when there is none."""
    if held_gpus or not node_gpus:
        return None
    return (f"this node has {node_gpus:g} GPU(s) but the model runs on its CPU: Ray gives an actor GPUs only when it "
            f"asks for them. Set {setting}")


def node_gpus() -> float:
    """GPUs Ray counts on the node this process runs on (0 outside Ray)."""
    import ray

    if not ray.is_initialized():
        return 0.0
    here = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == here), {})
    return float(node.get("Resources", {}).get("GPU", 0))


def warn_if_gpus_idle(setting: str, log: logging.Logger) -> str | None:
    """Log (and return) the warning when this process holds no GPU on a node that has some; None otherwise."""
    import ray

    held = len(ray.get_gpu_ids()) if ray.is_initialized() else 0
    message = idle_gpus_message(node_gpus(), held, setting)
    if message:
        log.warning("raypress: %s", message)
    return message
