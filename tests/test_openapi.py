"""The OpenAPI description is served and the live worker honours it.

schemathesis generates requests (valid and invalid) from /openapi.json and
sends them to a real worker: no answer may be a 5xx, and every answer must
match the description (status code, content type, body schema). Undeclared
methods must get 405.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

from vmworker import openapi

pytestmark = pytest.mark.timeout(240)

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance,"
          "unsupported_method")


def test_the_description_lists_every_endpoint_for_get_and_post(make_worker):
    w = make_worker().start()
    spec = requests.get(w.url + "/openapi.json", timeout=10).json()
    assert spec == openapi.spec()
    assert set(spec["paths"]) == {f"/vmachines/{n}" for n in openapi.ENDPOINTS}
    for ops in spec["paths"].values():
        assert set(ops) == {"get", "post"}


def test_schemathesis_finds_no_5xx_and_no_schema_violation(make_worker, tmp_path):
    w = make_worker().start()
    cli = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    result = subprocess.run(
        [cli, "run", f"{w.url}/openapi.json", "--checks", CHECKS,
         "--max-examples", "15", "--no-shrink", "--seed", "20261204",
         "--generation-database", "none", "--max-time", "90",
         "--no-color", "--warnings", "off"],
        cwd=tmp_path, capture_output=True, text=True, timeout=200)
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary
    assert " passed" in summary and "failures" not in summary.lower(), summary
    # The worker survived it all.
    assert requests.get(w.url + "/vmachines/list", timeout=10).status_code == 200
