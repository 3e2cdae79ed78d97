"""An item whose token row is empty (an empty text, a tokenizer that adds no special token)
is unscored, alone or beside other items, packed or padded: never another item's score."""

import asyncio
from pathlib import Path

import pytest
from tokenizers import processors

from service.config import RewardConfig
from service.models import EncodingMemo, HolisticScore, load_models
from tests import tiny_models
from tests.conftest import asgi_client, wait_ready

OTHERS = [("Where is it?", "It is here, by the door."), ("Why?", "Because it rained all day.")]


def with_bare_tokenizer(folder: Path) -> str:
    """`folder`'s model with the byte tokenizer adding no special token (as SmolLM2's adds
    none): an empty text is then an empty row."""
    tokenizer = tiny_models.build_byte_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A", pair="$A $B", special_tokens=[]
    )
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def bare_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bare-tokenizer")
    return {
        "llama": with_bare_tokenizer(tiny_models.build_llama_scalar_rm(root / "llama")),
        "bert": with_bare_tokenizer(tiny_models.build_encoder_scalar_rm(root / "bert", "bert")),
        "lm": with_bare_tokenizer(tiny_models.build_causal_lm(root / "lm")),
    }


def raws(model, batch) -> list[float | None]:
    return [out.raw for out in model.run(batch)]


def assert_empty_row_unscored_in_every_batch(model) -> None:
    memo = EncodingMemo()
    empty = model.prepare("", "", memo)
    assert empty.rows == ((),)
    others = [model.prepare(prompt, response, memo) for prompt, response in OTHERS]
    alone = [raws(model, [item])[0] for item in others]
    assert None not in alone
    assert raws(model, [empty]) == [None]
    assert raws(model, [empty, empty]) == [None, None]
    for batch, want in (
        ([others[0], empty], [alone[0], None]),
        ([empty, others[1]], [None, alone[1]]),
        ([others[0], others[1], empty], [*alone, None]),
        ([others[1], empty, others[0]], [alone[1], None, alone[0]]),
    ):
        got = raws(model, batch)
        assert [g is None for g in got] == [w is None for w in want]
        assert [g for g in got if g is not None] == pytest.approx(
            [w for w in want if w is not None], abs=1e-4
        )


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("pack_rows", [True, False])
def test_a_scalar_rm_leaves_an_empty_row_unscored(bare_models, tmp_path, family, pack_rows):
    spec = {
        "name": "h",
        "kind": "sequence_scalar",
        "path": bare_models[family],
        "device": "cpu",
        "template": "{prompt}{response}",
        "pack_rows": pack_rows,
    }
    (model,) = load_models(RewardConfig.model_validate({"holistic": spec}), tmp_path)
    assert model.describe()["packs_rows"] is pack_rows
    assert_empty_row_unscored_in_every_batch(model)


@pytest.mark.parametrize("pack_rows", [True, False])
def test_an_lm_likelihood_leaves_an_empty_row_unscored(bare_models, tmp_path, pack_rows):
    spec = {
        "name": "lm",
        "kind": "lm_likelihood",
        "path": bare_models["lm"],
        "device": "cpu",
        "prompt_template": "{prompt}",
        "pack_rows": pack_rows,
    }
    (model,) = load_models(RewardConfig.model_validate({"holistic": spec}), tmp_path)
    assert model.describe()["packs_rows"] is pack_rows
    assert_empty_row_unscored_in_every_batch(model)
    assert isinstance(model.run([model.prepare("", "", EncodingMemo())])[0], HolisticScore)


async def test_an_empty_response_never_gets_another_requests_aspect_score(
    tiny_paths, bare_models, tmp_path
):
    """Two requests at once (two trainers' steps), aspect only: the empty response's aspect
    is unscored (null), alone or batched with the other request's item, whose reward is its
    own."""
    config = RewardConfig.model_validate(
        {
            "holistic": {
                "name": "holistic",
                "kind": "sequence_scalar",
                "path": str(tiny_paths["llama_rm"]),
                "device": "cpu",
            },
            "aspects": [
                {
                    "name": "fluency",
                    "kind": "sequence_scalar",
                    "path": bare_models["llama"],
                    "device": "cpu",
                    "template": "{response}",
                    "sigmoid": False,
                }
            ],
            "combination": {"mode": "aspect_only"},
            "batching": {"max_wait_ms": 100},
            "cache": {"max_items": 0},
        }
    )
    empty = {"items": [{"prompt": "Q", "response": ""}]}
    other = {"items": [{"prompt": "Q", "response": "A perfectly good and fairly long answer."}]}
    async with asgi_client(config, tmp_path) as client:
        await wait_ready(client)

        async def score(body: dict) -> dict:
            reply = await client.post("/v1/rewards", json=body)
            assert reply.status_code == 200, reply.text
            result: dict = reply.json()["results"][0]
            return result

        empty_alone = await score(empty)
        other_alone = await score(other)
        empty_together, other_together = await asyncio.gather(score(empty), score(other))
    for result in (empty_alone, empty_together):
        assert result["aspects"]["fluency"]["segments"][0]["raw"] is None
    assert empty_together["reward"] == empty_alone["reward"]
    assert other_alone["aspects"]["fluency"]["segments"][0]["raw"] is not None
    assert other_together["reward"] == pytest.approx(other_alone["reward"], abs=1e-5)
