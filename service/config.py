"""Configuration: process settings (ALARM_* env / CLI) and the YAML reward definition.

Both are validated once at start-up and passed explicitly; nothing reads the environment
after that. The embedded default reward definition is `service/default_config.yaml`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.combine import AspectParams, CombineMode, HolisticParams
from service.errors import ConfigError
from service.model_specs import AspectSpec, HolisticSpec, StrictModel

DEFAULT_CONFIG_NAME = "default_config.yaml"


class ServiceSettings(BaseSettings):
    """Process-level settings; every field is also an ALARM_<NAME> environment variable."""

    model_config = SettingsConfigDict(env_prefix="ALARM_", extra="ignore")

    config: Path | None = Field(None, description="YAML reward definition; None = embedded")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("config", mode="before")
    @classmethod
    def _empty_means_default(cls, value: object) -> object:
        # ALARM_CONFIG="" (e.g. an unset compose variable) means the embedded default.
        return None if value == "" else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        # INFO as well as info: logging's own names are upper case.
        return value.lower() if isinstance(value, str) else value

    cache_dir: Path = Field(
        Path.home() / ".cache" / "alarm-serve",
        description="where packaged models are converted once (e.g. GGUF -> safetensors)",
    )
    api_keys_file: Path | None = Field(
        None, description="YAML mapping trainer name -> API key; scoring routes then need one"
    )
    api_keys: SecretStr | None = Field(
        None, description="the same inline: 'trainer-a:key-a,trainer-b:key-b'"
    )
    metrics_require_auth: bool = Field(False, description="also protect /metrics")
    front_ends: int = Field(
        0,
        ge=0,
        le=64,
        description="HTTP front-end processes in front of one engine process (the models); "
        "0 serves HTTP from the engine's own process",
    )


class CombinationConfig(StrictModel):
    """docs/method.md section 2; the defaults are the paper's long-form QA settings."""

    mode: CombineMode = CombineMode.hierarchical
    threshold: float = Field(0.6, description="eps, on the z-normalised holistic reward")
    holistic_weight: float = Field(5.0, description="lambda")
    min_response_chars: int = Field(
        1,
        ge=0,
        description="responses shorter than this after strip are degenerate; an empty one "
        "always is (0 and 1 mean the same)",
    )
    degenerate_floor: float = Field(
        -10.0,
        description="r_h of a degenerate response, which then gets holistic_weight * this "
        "alone, in every mode (the paper's code)",
    )


class BatchingConfig(StrictModel):
    max_batch_tokens: int = Field(16384, ge=64, description="padded tokens per forward")
    max_batch_size: int = Field(64, ge=1)
    max_wait_ms: float = Field(5.0, ge=0)
    fill_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="once a batch has its device (any device model's, CPU too), how long it "
        "may keep the device idle waiting for more items while it is not full. Meant for a "
        "GPU bound by its host, which prices a forward by the call; at low load every "
        "forward waits it out (0 = run at once; not measured on a GPU yet)",
    )
    min_padding_efficiency: float = Field(
        0.0,
        ge=0,
        le=1,
        description="cut length-sorted batches whose real/padded tokens would fall below "
        "this; on CPUs, where batching buys little, padding is what costs (0 = cut only by "
        "budget and size; models that pack their rows take items in arrival order and pad "
        "little without it)",
    )
    max_queue_items: int = Field(4096, ge=1, description="admitted items not yet scored")
    cpu_workers: int = Field(
        2,
        ge=1,
        description="forwards run at once on the CPU, each on cores / cpu_workers torch "
        "threads (GPUs: gpu_workers). A model takes a second slot only while no other "
        "model has items pending or being tokenised; its last pending batch then runs in "
        "two halves side by side if another slot is free, so that no core idles at the "
        "end of a burst. "
        "On the 2-core VM, 2 against 1 in paired rounds (before the second-slot rule): "
        "1.23x items/s with one single-item client, 1.19x with 256, 1.10-1.11x with 1 and "
        "8 clients sending 16 items, level with 8 and 64 single-item clients "
        "(benchmarks/HISTORY.md, session 6)",
    )
    gpu_workers: int = Field(
        1,
        ge=1,
        description="forwards run at once on each GPU, each from its own thread on the "
        "device's default stream: a GPU bound by its host (one H200 was busy 8 to 29 % of "
        "the time, benchmarks/RESULTS.md) may overlap one forward's kernel launches with "
        "another's. As on the CPU, a model's last batch may then run as two halves side "
        "by side. Not measured yet, so 1 by default",
    )
    gil_switch_interval_ms: float | None = Field(
        None,
        gt=0,
        le=100,
        description="how long a busy event loop may keep the GIL from a forward's thread "
        "that wants it back (sys.setswitchinterval, process-wide while the engine serves). "
        "PyTorch lets go of the GIL in each op a forward calls from Python (34 to 37 per "
        "packed forward here) and takes it back after. null = Python's 5 ms; meant for "
        "GPUs, where a forward takes milliseconds; not measured on a GPU yet "
        "(benchmarks/RESULTS.md)",
    )
    forward_overhead_tokens: int | None = Field(
        None,
        ge=0,
        description="what one forward call costs beyond its padded tokens, in tokens: "
        "length-sorted batches are cut where padded tokens + this per call is least; "
        "null = 64 on CPU (measured), 4096 on GPU (not yet measured)",
    )


class LimitsConfig(StrictModel):
    max_items_per_request: int = Field(512, ge=1)
    max_text_chars: int = Field(100_000, ge=1)
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_items_in_flight_per_trainer: int = Field(
        2048, ge=1, description="one trainer's admitted, unanswered items; beyond: 429"
    )
    max_requests_per_second_per_trainer: float | None = Field(
        None,
        gt=0,
        description="one trainer's sustained rate on the scoring routes; beyond: 429 "
        "(null = unlimited)",
    )
    request_burst_per_trainer: int | None = Field(
        None,
        ge=1,
        description="requests a trainer may send at once above that rate "
        "(null = one second's worth, at least 1)",
    )


class CacheConfig(StrictModel):
    """Identical items (same prompt and response) reuse each model's earlier output."""

    max_items: int = Field(
        65536,
        ge=0,
        description="outputs kept per model, least recently used evicted first (0 = off)",
    )


class OpenRLHFConfig(StrictModel):
    """How `POST /get_reward` splits OpenRLHF's full texts into prompt and response."""

    response_separator: str | None = Field(
        None,
        description="used when a request has no `prompts`: the response is the text after "
        "the last occurrence of this string (e.g. 'Assistant:')",
    )


class RewardConfig(StrictModel):
    """The reward definition: models, combination parameters, batching and limits."""

    holistic: HolisticSpec
    aspects: list[AspectSpec] = Field(default_factory=list)
    combination: CombinationConfig = CombinationConfig()
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    cache: CacheConfig = CacheConfig()
    openrlhf: OpenRLHFConfig = OpenRLHFConfig()

    @model_validator(mode="after")
    def _limits_admit_one_full_request(self) -> RewardConfig:
        largest = self.limits.max_items_per_request
        for key, value in (
            ("batching.max_queue_items", self.batching.max_queue_items),
            ("limits.max_items_in_flight_per_trainer", self.limits.max_items_in_flight_per_trainer),
        ):
            if value < largest:
                raise ValueError(
                    f"{key}={value} is below limits.max_items_per_request={largest}: "
                    "a full request could never be admitted"
                )
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> RewardConfig:
        names = [self.holistic.name, *(a.name for a in self.aspects)]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique, repeated: {duplicates}")
        return self

    def holistic_params(self) -> HolisticParams:
        c = self.combination
        return HolisticParams(
            mu=self.holistic.mu,
            sigma=self.holistic.sigma,
            threshold=c.threshold,
            weight=c.holistic_weight,
            min_response_chars=c.min_response_chars,
            degenerate_floor=c.degenerate_floor,
        )

    def aspect_params(self) -> tuple[AspectParams, ...]:
        return tuple(
            AspectParams(a.name, a.weight, a.scale, a.shift, a.sigmoid) for a in self.aspects
        )


def load_reward_config(path: Path | None) -> RewardConfig:
    """Read and validate a YAML reward definition (None = the embedded default)."""
    if path is None:
        text = resources.files("service").joinpath(DEFAULT_CONFIG_NAME).read_text()
        source = f"embedded {DEFAULT_CONFIG_NAME}"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc})") from exc
        source = str(path)
    try:
        data = yaml.safe_load(text)
        return RewardConfig.model_validate(data)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from exc
