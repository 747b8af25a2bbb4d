"""Property-based requests from the server's own OpenAPI document (schemathesis): every route answers every
generated request without a server error, and only with a status the document lists."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

EXAMPLES = 25  # per route: a bounded run (about 10 s for all routes on the tiny model)


@pytest.fixture(scope="module")
def fuzz_url(deploy, tiny_causal_dir, tmp_path_factory):
    return deploy("fuzz", {"model": str(tiny_causal_dir), "model_name": "fuzz", "default_max_tokens": 4,
                           "max_num_seqs": 4, "batch_storage": str(tmp_path_factory.mktemp("fuzz-batches"))})


@pytest.mark.timeout(420)
def test_every_route_survives_generated_requests(fuzz_url):
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14  # every route of the app, the Batch API's included
    for operation in operations:

        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def survives(case):
            case.call_and_validate(base_url=fuzz_url, checks=[not_a_server_error, status_code_conformance],
                                   timeout=60)

        try:
            survives()
        except Exception as e:
            raise AssertionError(f"{operation.method.upper()} {operation.path}: {e}") from e
