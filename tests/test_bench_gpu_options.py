"""The benchmark's GPU options, checked on the CPU: real-size RMs built from configs, and
GPU utilisation sampled by nvidia-smi (a stand-in script here)."""

from __future__ import annotations

import os
import time

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from benchmarks.gpu_utilisation import GpuUtilisation, parse_samples
from benchmarks.models import (
    HOLISTIC_SIZES,
    prepare_random_holistic,
    random_holistic_config,
    write_config,
)
from service.config import load_reward_config
from service.engine import batch_limits
from service.models import load_models
from service.models.packaged import MINILM, PACKAGED_PREFIX, resolve_model_path
from tests.test_models import PROMPT, RESPONSES, assert_batch_invariant

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


@pytest.mark.parametrize(
    ("size", "stands_in_for"),
    # Parameters without the tokenizer-dependent embeddings: DeBERTa-v3-large has 304M in
    # its backbone (435M with its 128k-token embeddings), Llama-2-7B 6.48B in its layers
    # and norm (6.74B with 32k-token embeddings and LM head).
    [("deberta-large", 304e6), ("llama-7b", 6.48e9)],
)
def test_real_size_configs_have_the_size_of_the_models_they_stand_in_for(size, stands_in_for):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(PACKAGED_PREFIX + MINILM, None))
    config = random_holistic_config(HOLISTIC_SIZES[size], tokenizer)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    embeddings = model.get_input_embeddings().weight.numel()
    backbone = sum(p.numel() for p in model.parameters()) - embeddings
    assert backbone == pytest.approx(stands_in_for, rel=0.02)
    assert config.num_labels == 1 and config.vocab_size == len(tokenizer)


@pytest.mark.parametrize("size", list(HOLISTIC_SIZES))
def test_a_random_rm_of_each_architecture_loads_and_scores_batch_invariantly(
    size, tmp_path, monkeypatch
):
    monkeypatch.setitem(HOLISTIC_SIZES, "tiny", {**HOLISTIC_SIZES[size], **TINY})
    if size == "llama-7b":
        HOLISTIC_SIZES["tiny"]["num_key_value_heads"] = 2
    config_path = tmp_path / "config.yaml"
    relevance = resolve_model_path(PACKAGED_PREFIX + MINILM, tmp_path)  # as a plain folder
    written = write_config(
        tmp_path,
        config_path,
        holistic="tiny",
        dtype="bfloat16",
        relevance_path=relevance,
        cpu_workers=1,
    )
    assert written["holistic"]["path"] == str(
        prepare_random_holistic(tmp_path, "tiny", HOLISTIC_SIZES["tiny"], "bfloat16")
    )  # built once, then reused
    config = load_reward_config(config_path)
    assert config.holistic.dtype == "bfloat16" and config.aspects[0].dtype == "bfloat16"
    assert config.aspects[0].path == relevance and config.batching.cpu_workers == 1
    holistic = load_models(config, tmp_path)[0]
    assert holistic.describe()["architecture"][0].startswith(
        {"deberta-large": "DebertaV2", "llama-7b": "Llama"}[size]
    )
    assert_batch_invariant(holistic, PROMPT, RESPONSES)


def test_the_trace_and_batch_knobs_reach_every_model_and_the_batcher(tmp_path, monkeypatch):
    # A GPU session compares traced against eager forwards and larger batches in one call.
    monkeypatch.setitem(HOLISTIC_SIZES, "tiny", {**HOLISTIC_SIZES["deberta-large"], **TINY})
    config_path = tmp_path / "config.yaml"
    relevance = resolve_model_path(PACKAGED_PREFIX + MINILM, tmp_path)
    write_config(
        tmp_path,
        config_path,
        holistic="tiny",
        relevance_path=relevance,
        trace_packed=False,
        max_batch_size=256,
        max_batch_tokens=65536,
        gil_switch_interval_ms=0.5,
    )
    config = load_reward_config(config_path)
    assert (config.batching.max_batch_size, config.batching.max_batch_tokens) == (256, 65536)
    assert config.batching.gil_switch_interval_ms == 0.5
    models = load_models(config, tmp_path)[:2]
    assert [(batch_limits(config, m).max_batch_size) for m in models] == [256, 256]
    assert [batch_limits(config, m).max_batch_tokens for m in models] == [65536, 65536]
    described = [model.describe() for model in models]
    assert [d["packs_rows"] for d in described] == [True, True]
    assert [d["traced"] for d in described] == [False, False]


def _fake_nvidia_smi(folder, lines: str):
    script = folder / "nvidia-smi"
    script.write_text(f'#!/bin/sh\necho "$@" > {folder}/args\nprintf "{lines}"\nexec sleep 60\n')
    script.chmod(0o755)
    return script


def test_gpu_utilisation_is_the_mean_of_nvidia_smi_samples_over_the_block(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, "37\\n41\\n[N/A]\\n45\\n")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with GpuUtilisation() as gpu:
        time.sleep(0.5)
    assert gpu.samples == [37.0, 41.0, 45.0]
    assert gpu.mean_percent == pytest.approx(41.0)
    args = (tmp_path / "args").read_text().split()
    assert "--query-gpu=utilization.gpu" in args and "--loop-ms=100" in args


def test_without_nvidia_smi_there_is_no_gpu_figure():
    with GpuUtilisation(command="no-such-nvidia-smi") as gpu:
        pass
    assert gpu.mean_percent is None
    assert parse_samples("12\nnot a number\n\n") == [12.0]
