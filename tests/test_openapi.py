"""openapi.yaml is generated from the app; this fails when the two drift apart."""

from pathlib import Path

import yaml

from service.__main__ import render_openapi

SPEC = Path(__file__).resolve().parents[1] / "openapi.yaml"


def test_openapi_yaml_matches_the_served_schema():
    committed = yaml.safe_load(SPEC.read_text())
    served = yaml.safe_load(render_openapi())
    assert committed == served, "openapi.yaml is stale: run `make openapi`"


def test_every_route_is_in_the_contract():
    paths = yaml.safe_load(SPEC.read_text())["paths"]
    assert {"/v1/rewards", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(paths)
    errors = paths["/v1/rewards"]["post"]["responses"]
    assert {"200", "413", "422", "503"} <= set(errors)
