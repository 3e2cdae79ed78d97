"""Shared fixtures: tiny transformers models built offline, configs, and a live ASGI app."""

import asyncio
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import httpx
import pytest
import yaml
from asgi_lifespan import LifespanManager
from prometheus_client import CollectorRegistry

from service.config import RewardConfig, ServiceSettings
from tests import tiny_models


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "llama_rm": tiny_models.build_llama_scalar_rm(root / "llama-rm"),
        "deberta_rm": tiny_models.build_deberta_scalar_rm(root / "deberta-rm"),
        "segment": tiny_models.build_segment_classifier(root / "segment"),
        "causal_lm": tiny_models.build_causal_lm(root / "causal-lm"),
    }


@pytest.fixture(scope="session")
def scalar_rms(tiny_paths, tmp_path_factory) -> dict[str, str]:
    """Tiny scalar RMs of each head family the packed path reads."""
    root = tmp_path_factory.mktemp("scalar-rms")
    return {
        "llama": str(tiny_paths["llama_rm"]),
        "deberta": str(tiny_paths["deberta_rm"]),
        "bert": str(tiny_models.build_encoder_scalar_rm(root / "bert", "bert")),
        "roberta": str(tiny_models.build_encoder_scalar_rm(root / "roberta", "roberta")),
    }


def tiny_config_dict(paths: dict[str, Path], **sections) -> dict:
    """A full hierarchical config on tiny models: a decoder holistic RM and three aspects."""
    config = {
        "holistic": {
            "name": "holistic",
            "kind": "sequence_scalar",
            "path": str(paths["llama_rm"]),
            "device": "cpu",
            "max_length": 256,
            "mu": 0.0,
            "sigma": 1.0,
        },
        "aspects": [
            {
                "name": "factuality",
                "kind": "segment_classifier",
                "path": str(paths["segment"]),
                "device": "cpu",
                "max_length": 256,
                "label_values": {0: -0.5, 1: 0.5},
            },
            {
                "name": "completeness",
                "kind": "sequence_scalar",
                "path": str(paths["deberta_rm"]),
                "device": "cpu",
                "max_length": 256,
                "scale": 0.3 / 8.30116,
                "shift": 0.44678,
                "sigmoid": False,
            },
            {"name": "length", "kind": "rule", "unit": "words", "mean": 20, "weight": 0.5},
        ],
        # A negative threshold so that the tiny models' scores pass the gate and aspects show.
        "combination": {"threshold": -100.0, "holistic_weight": 1.0},
        "batching": {"max_batch_tokens": 2048, "max_batch_size": 16, "max_wait_ms": 5},
    }
    config.update(sections)
    return config


@pytest.fixture(scope="session")
def tiny_config(tiny_paths) -> RewardConfig:
    return RewardConfig.model_validate(tiny_config_dict(tiny_paths))


@pytest.fixture(scope="session")
def tiny_config_file(tiny_paths, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_paths)))
    return path


async def wait_ready(client: httpx.AsyncClient, timeout_s: float = 120) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        response = await client.get("/readyz")
        if response.status_code == 200:
            return
        if "loading failed" in response.text:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"service not ready: {response.text}")


def asgi_client(config: RewardConfig, tmp_path: Path):
    """An httpx client wired to a freshly created app through its real lifespan."""
    from service.api import create_app

    app = create_app(ServiceSettings(cache_dir=tmp_path), config, registry=CollectorRegistry())

    class _Client:
        async def __aenter__(self) -> httpx.AsyncClient:
            self._lifespan = LifespanManager(app, startup_timeout=120, shutdown_timeout=60)
            await self._lifespan.__aenter__()
            transport = httpx.ASGITransport(app=self._lifespan.app)
            self._client = httpx.AsyncClient(transport=transport, base_url="http://test")
            return self._client

        async def __aexit__(self, *exc) -> None:
            await self._client.aclose()
            await self._lifespan.__aexit__(*exc)

    return _Client()
