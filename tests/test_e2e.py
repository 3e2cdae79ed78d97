"""End to end: `alarm-serve serve` as a real process, spoken to over real HTTP."""

import asyncio
import signal
import subprocess
import time

import httpx
import pytest

from tests.server_process import ALARM_SERVE, free_port, start, wait_ready

PROMPT = "question: Who wrote Hamlet? context: Hamlet is a tragedy by William Shakespeare."


def in_flight_items(base_url: str) -> float:
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith("alarm_in_flight_items "):
            return float(line.split()[1])
    return 0.0


# 0: one process; 2: two HTTP front-end processes over one engine process, which must stop
# as gracefully (the front-ends drain their requests first, then the engine stops).
@pytest.fixture(params=[0, 2], ids=["one-process", "front-ends"])
def server(request, tiny_config_file, tmp_path):
    port = free_port()
    # Config and cache from the environment, port from a flag: both paths are exercised.
    process = start(
        ["--port", str(port)],
        {
            "ALARM_CONFIG": str(tiny_config_file),
            "ALARM_CACHE_DIR": str(tmp_path),
            "ALARM_FRONT_ENDS": str(request.param),
        },
    )
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(process, base_url, timeout_s=120)
    yield process, base_url
    if process.poll() is None:
        process.kill()
        process.wait()


def test_serve_scores_scrapes_and_stops_gracefully_on_sigterm(server):
    process, base_url = server
    reply = httpx.post(
        f"{base_url}/v1/rewards",
        json={"items": [{"prompt": PROMPT, "response": "Shakespeare. He was English."}]},
    )
    assert reply.status_code == 200, reply.text
    result = reply.json()["results"][0]
    assert len(result["aspects"]["factuality"]["segments"]) == 2
    metrics = httpx.get(f"{base_url}/metrics").text
    assert 'alarm_requests_total{route="/v1/rewards",status="200"} 1.0' in metrics

    # A load of concurrent requests; SIGTERM while they are in flight; all must complete.
    items = [{"prompt": PROMPT, "response": "Shakespeare wrote it. " * 4}] * 16

    async def load() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            sends = [
                asyncio.create_task(client.post("/v1/rewards", json={"items": items}))
                for _ in range(12)
            ]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if await asyncio.to_thread(in_flight_items, base_url) > 0:
                    break
            process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*sends)

    replies = asyncio.run(load())
    assert [r.status_code for r in replies] == [200] * 12
    assert all(len(r.json()["results"]) == 16 for r in replies)
    # uvicorn re-raises the captured SIGTERM once it has drained and shut down cleanly.
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in process.stdout.read()


def test_invalid_config_exits_with_a_message_naming_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("holistic:\n  name: h\n  kind: sequence_scalar\n  path: x\n  sigma: -1\n")
    result = subprocess.run(
        [ALARM_SERVE, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "holistic.sequence_scalar.sigma" in result.stderr


def test_a_missing_model_path_exits_nonzero(tmp_path):
    config = tmp_path / "missing.yaml"
    config.write_text(
        f"holistic:\n  name: h\n  kind: sequence_scalar\n  path: {tmp_path / 'nope'}\n"
    )
    port = free_port()
    result = subprocess.run(
        [ALARM_SERVE, "serve", "--config", str(config), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "model loading failed" in result.stderr


@pytest.mark.slow
def test_embedded_default_config_ranks_correct_above_wrong_above_gibberish():
    """The README example, on the packaged real weights (SmolLM2 + MiniLM)."""
    port = free_port()
    process = start(["--port", str(port)], {})
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base_url, timeout_s=600)
        question = "What is the capital of France?"
        responses = [
            "The capital of France is Paris.",
            "The capital of France is Berlin.",
            "Blorp zizzle fnord wub.",
        ]
        reply = httpx.post(
            f"{base_url}/v1/rewards",
            json={"items": [{"prompt": question, "response": r} for r in responses]},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        correct, wrong, gibberish = (r["reward"] for r in reply.json()["results"])
        assert correct > wrong > gibberish
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
