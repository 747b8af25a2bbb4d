"""Serve on the test session's Ray, on loopback; each test module deploys its applications through `deploy`."""

import pytest
from ray import serve

from serve.app import ModelServer, server_args

PORT = 8011
URL = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def deploy(ray_local):
    """deploy(name, args, **deployment_options) -> the application's base URL (route /name)."""
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})

    def run(name: str, args: dict, **deployment_options) -> str:
        app = ModelServer.options(**deployment_options).bind(**server_args(args))
        serve.run(app, name=name, route_prefix=f"/{name}")
        return f"{URL}/{name}"

    yield run
    serve.shutdown()
