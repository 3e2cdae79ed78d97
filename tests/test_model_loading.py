"""What a model's checkpoint decides at load: how long a row its positions allow, and which
weights its scalar head is (UltraRM's `regression_head`), through the real loader."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, LlamaConfig, LlamaModel

from service.config import RewardConfig
from service.errors import ConfigError
from service.models import EncodingMemo, load_models
from service.models.packaged import MINILM, PACKAGED_PREFIX, resolve_model_path
from tests import tiny_models


def holistic(path: str, **extra) -> dict:
    return {"name": "h", "kind": "sequence_scalar", "path": path, "device": "cpu", **extra}


def load(spec: dict, tmp_path: Path):
    return load_models(RewardConfig.model_validate({"holistic": spec}), tmp_path)[0]


# --- max_length against the position table ---------------------------------------------------


@pytest.mark.parametrize(
    ("family", "rows"),
    # The tiny encoders' tables hold 2048 positions; RoBERTa's count from the pad id + 1.
    [("bert", tiny_models.MAX_POSITIONS), ("roberta", tiny_models.MAX_POSITIONS - 2)],
)
def test_a_max_length_past_the_position_table_is_refused_at_load(
    scalar_rms, tmp_path, family, rows
):
    with pytest.raises(ConfigError) as refused:
        load(holistic(scalar_rms[family], max_length=rows + 1), tmp_path)
    message = str(refused.value)
    assert message.startswith("h: max_length")
    assert f"max_length {rows + 1}" in message and f"at most {rows}" in message
    model = load(holistic(scalar_rms[family], max_length=rows), tmp_path)
    # The longest row it allows scores, alone and beside a short one.
    memo = EncodingMemo()
    longest = model.prepare("Why? " * rows, "Because.", memo)
    assert longest.length == rows
    short = model.prepare("Why?", "Because.", memo)
    assert all(out.raw is not None for out in model.run([short, longest]))


def test_models_whose_positions_need_no_table_load_past_their_max_positions(tiny_paths, tmp_path):
    """Rotary (Llama) and relative (DeBERTa-v3) positions: no table bounds a row."""
    longer = tiny_models.MAX_POSITIONS * 2
    load(holistic(str(tiny_paths["llama_rm"]), max_length=longer), tmp_path)
    load(holistic(str(tiny_paths["deberta_rm"]), max_length=longer), tmp_path)
    lm = {"name": "lm", "kind": "lm_likelihood", "path": str(tiny_paths["causal_lm"])}
    load({**lm, "device": "cpu", "max_length": longer}, tmp_path)


def test_the_packaged_minilm_allows_512_tokens(tmp_path):
    from service.models.loading import position_table_rows

    path = resolve_model_path(PACKAGED_PREFIX + MINILM, tmp_path)
    assert position_table_rows(AutoModel.from_pretrained(path)) == 512


# --- UltraRM's regression head ---------------------------------------------------------------


def build_ultrarm_like(folder: Path, layout: str, num_labels: int | None) -> tuple[Path, dict]:
    """A tiny checkpoint laid out as UltraRM-13b's (LlamaRewardModel): a LlamaModel under
    `model.` and the scalar head as `regression_head.weight`, no `score.weight`; its config
    names no labels unless `num_labels` is given. Returns the folder and its weights."""
    tokenizer = tiny_models.build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.architectures = ["LlamaRewardModel"]
    if num_labels is not None:
        config.num_labels = num_labels
    torch.manual_seed(0)
    body = LlamaModel(config)
    weights = {f"model.{k}": v.detach().clone() for k, v in body.state_dict().items()}
    weights["regression_head.weight"] = torch.randn(1, config.hidden_size)
    folder.mkdir(parents=True)
    if layout == "safetensors":
        save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors")
    else:
        torch.save(weights, folder / "pytorch_model.bin")
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, weights


def ultrarm_score(folder: Path, weights: dict, text: str) -> float:
    """UltraRM's own computation: the regression head on the last token's hidden state."""
    from transformers import AutoTokenizer

    body = LlamaModel(LlamaConfig.from_pretrained(folder))
    body.load_state_dict(
        {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    )
    body.eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(folder)(text)["input_ids"]])
    with torch.inference_mode():
        hidden = body(input_ids=ids).last_hidden_state[0, -1]
    return float(hidden @ weights["regression_head.weight"][0])


@pytest.mark.parametrize(
    ("layout", "num_labels", "pack_rows"),
    [("safetensors", None, True), ("safetensors", 1, False), ("bin", None, False)],
)
def test_an_ultrarm_style_regression_head_scores_as_ultrarm_does(
    tmp_path, layout, num_labels, pack_rows
):
    folder, weights = build_ultrarm_like(tmp_path / "ultrarm", layout, num_labels)
    model = load(holistic(str(folder), pack_rows=pack_rows), tmp_path)
    assert model.describe()["packs_rows"] is pack_rows
    prompts = [("Who wrote Hamlet?", "Shakespeare wrote it, around 1600."), ("Why?", "No.")]
    memo = EncodingMemo()
    outputs = model.run([model.prepare(prompt, response, memo) for prompt, response in prompts])
    for (prompt, response), output in zip(prompts, outputs, strict=True):
        text = f"Human: {prompt}\nAssistant: {response}"
        assert output.raw == pytest.approx(ultrarm_score(folder, weights, text), abs=1e-4)


@pytest.mark.parametrize("kind", ["embedding_similarity", "segment_classifier"])
def test_an_aspect_model_past_its_position_table_is_refused_at_load(tiny_paths, tmp_path, kind):
    """The aspect adapters load through the same check as the holistic ones."""
    if kind == "embedding_similarity":
        path, rows = PACKAGED_PREFIX + MINILM, 512
    else:
        path, rows = str(tiny_paths["segment"]), tiny_models.MAX_POSITIONS
    aspect = {"name": "a", "kind": kind, "path": path, "device": "cpu", "max_length": rows + 1}
    config = {"holistic": holistic(str(tiny_paths["llama_rm"])), "aspects": [aspect]}
    with pytest.raises(ConfigError, match=f"a: max_length {rows + 1} .* at most {rows}"):
        load_models(RewardConfig.model_validate(config), tmp_path)
    load_models(
        RewardConfig.model_validate(config | {"aspects": [aspect | {"max_length": rows}]}), tmp_path
    )


# --- a segment classifier's labels --------------------------------------------------------


def test_a_three_label_segment_classifier_needs_its_labels_named(tiny_paths, tmp_path):
    """The audit: the default labels {0, 1} were taken on a three-label model (Fine-Grained
    RLHF's factuality RM reads {0, 2}) without a word; now the load says what to set."""
    path = tiny_models.build_segment_classifier(tmp_path / "three", num_labels=3)
    aspect = {"name": "fact", "kind": "segment_classifier", "path": str(path), "device": "cpu"}
    config = {"holistic": holistic(str(tiny_paths["llama_rm"])), "aspects": [aspect]}
    with pytest.raises(ConfigError, match="fact: the model has 3 labels: set label_values"):
        load_models(RewardConfig.model_validate(config), tmp_path)

    named = aspect | {"label_values": {0: -0.5, 2: 0.5}}
    _, model = load_models(RewardConfig.model_validate(config | {"aspects": [named]}), tmp_path)
    (output,) = model.run([model.prepare("Who?", "Ada did. Then Bob.", EncodingMemo())])
    raws = [segment.raw for segment in output.segments]
    assert len(raws) == 2 and set(raws) <= {-0.5, 0.5}
