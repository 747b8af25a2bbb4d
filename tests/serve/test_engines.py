"""serve.engines: which engine a replica runs on, and what it says about settings that engine does not take."""

import logging

from serve.app import ModelServer
from serve.engines import warn_unused


def test_settings_vllm_does_not_take_are_named_when_set_and_silent_at_their_defaults(caplog):
    cls = ModelServer.func_or_class  # Serve's ingress subclass: its __init__ takes *args; the defaults are its base's
    defaults = {"max_batch_tokens": 512, "block_size": 16, "kv_cache_tokens": None, "prefix_caching": True}
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        warn_unused(cls, defaults)
        assert not caplog.records
        warn_unused(cls, {**defaults, "block_size": 32, "prefix_caching": False})
    (record,) = caplog.records
    assert "block_size, prefix_caching apply to raypress's engine only" in record.getMessage()
