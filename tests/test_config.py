"""Configuration is validated once, with errors that name the offending key."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from service.config import RewardConfig, ServiceSettings, load_reward_config
from service.engine import batch_limits
from service.errors import ConfigError

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_embedded_default_config_is_valid():
    config = load_reward_config(None)
    assert config.holistic.kind == "lm_likelihood"
    assert {a.kind for a in config.aspects} == {"embedding_similarity", "rule"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    assert load_reward_config(path).holistic.name == "holistic"


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("holistic: {name: h, kind: magic, path: x}", "holistic"),
        ("holistic: {name: h, kind: sequence_scalar, path: x, sigma: 0}", "sigma"),
        ("holistic: {name: h, kind: sequence_scalar, path: x, colour: red}", "colour"),
        ("holistic: {name: h, kind: sequence_scalar, path: x, device: tpu}", "device"),
        (
            "holistic: {name: a, kind: sequence_scalar, path: x}\n"
            "aspects: [{name: a, kind: rule, mean: 3}]",
            "unique",
        ),
        (
            "holistic: {name: h, kind: sequence_scalar, path: x}\n"
            "aspects: [{name: l, kind: rule, unit: tokens, mean: 3}]",
            "tokenizer_path",
        ),
        ("holistic: [unclosed", "invalid YAML"),
    ],
)
def test_bad_config_fails_with_a_message_naming_the_key(tmp_path, yaml_text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=needle):
        load_reward_config(path)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_reward_config(tmp_path / "absent.yaml")


def test_settings_come_from_alarm_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("ALARM_PORT", "9123")
    monkeypatch.setenv("ALARM_HOST", "0.0.0.0")
    monkeypatch.setenv("ALARM_CONFIG", str(tmp_path / "c.yaml"))
    settings = ServiceSettings()
    assert (settings.port, settings.host, settings.config) == (9123, "0.0.0.0", tmp_path / "c.yaml")
    assert ServiceSettings(port=1).port == 1  # explicit (CLI) values win over the environment


def test_combination_parameters_flow_into_the_math():
    config = RewardConfig.model_validate(
        {
            "holistic": {"name": "h", "kind": "sequence_scalar", "path": "x", "mu": 2, "sigma": 4},
            "aspects": [{"name": "l", "kind": "rule", "mean": 5, "weight": 0.3, "sigmoid": False}],
            "combination": {"threshold": 0.5, "holistic_weight": 3},
        }
    )
    holistic = config.holistic_params()
    assert (holistic.mu, holistic.sigma, holistic.threshold, holistic.weight) == (2, 4, 0.5, 3)
    (aspect,) = config.aspect_params()
    assert (aspect.name, aspect.weight, aspect.sigmoid) == ("l", 0.3, False)


@pytest.mark.parametrize(
    ("rule", "needle"),
    [({"rule": "regex"}, "needs pattern"), ({"rule": "regex", "pattern": "("}, "invalid pattern")],
)
def test_regex_rules_need_a_valid_pattern(rule, needle):
    spec = {
        "holistic": {"name": "h", "kind": "sequence_scalar", "path": "x"},
        "aspects": [{"name": "r", "kind": "rule", "mean": 1, **rule}],
    }
    with pytest.raises(ValueError, match=needle):
        RewardConfig.model_validate(spec)


def test_an_empty_alarm_config_means_the_embedded_default(monkeypatch):
    monkeypatch.setenv("ALARM_CONFIG", "")
    assert ServiceSettings().config is None


def test_a_fill_wait_reaches_the_batch_limits_in_seconds_and_is_off_by_default():
    config = RewardConfig.model_validate(
        {
            "holistic": {"name": "h", "kind": "sequence_scalar", "path": "x"},
            "batching": {"fill_wait_ms": 20},
        }
    )
    on_gpu = SimpleNamespace(device="cuda:0")
    assert batch_limits(config, on_gpu).fill_wait_s == pytest.approx(0.02)  # type: ignore[arg-type]
    assert load_reward_config(None).batching.fill_wait_ms == 0.0  # not measured on a GPU yet
