"""GPUs left idle (jobs.placement): the warning's rule here; on a node that counts a GPU, in
tests/jobs/test_cluster.py's two-node cluster."""

import logging

import pytest

from jobs.placement import idle_gpus_message, node_gpus, warn_if_gpus_idle


def test_the_warning_names_the_setting_only_where_gpus_sit_idle():
    message = idle_gpus_message(4, 0, "--num-gpus-per-actor 1")
    assert message.startswith("this node has 4 GPU(s) but the model runs on its CPU") and message.endswith(
        "Set --num-gpus-per-actor 1")
    assert idle_gpus_message(4, 1, "x") is None  # it holds one
    assert idle_gpus_message(0, 0, "x") is None  # a CPU node


@pytest.mark.timeout(120)
def test_an_actor_on_a_node_without_gpus_is_not_warned(ray_local):
    import ray

    @ray.remote(num_cpus=0.1)
    def probe():
        return node_gpus(), warn_if_gpus_idle("--num-gpus-per-actor 1", logging.getLogger("probe"))

    assert ray.get(probe.remote()) == (0.0, None)
    assert warn_if_gpus_idle("x", logging.getLogger("probe")) is None  # the driver, too
