"""The multi-trainer load test, run briefly on tiny models: it must account for every request."""

import json
import os

import yaml

from benchmarks import trainers_load
from tests.conftest import tiny_config_dict


def test_the_load_test_reports_every_trainer_round_and_memory(tiny_paths, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_paths)))
    out = tmp_path / "out"
    argv = ["--out", str(out), "--config", str(config), "--trainers", "2", "--seconds", "2"]
    assert trainers_load.main([*argv, "--rounds", "2", "--items-per-request", "4"]) == 0
    assert "ALARM_API_KEYS" not in os.environ  # the keys went to the server process only

    report = json.loads((out / "trainers_load.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for round_ in report["rounds"]:
        assert round_["errors"] == {}
        assert set(round_["trainers"]) == {"trainer-0", "trainer-1"}
        for trainer in round_["trainers"].values():
            assert trainer["ok"] == trainer["requests"] > 0
            assert 0 < trainer["p50_ms"] <= trainer["p95_ms"] <= trainer["p99_ms"]
        total = sum(t["items_per_s"] for t in round_["trainers"].values())
        assert round_["items_per_s"] <= total + 1e-9  # the slowest trainer's clock bounds it
        assert min(round_["rss_before_mb"], round_["rss_after_mb"]) > 0
    growth = report["rounds"][-1]["rss_after_mb"] - report["rounds"][0]["rss_after_mb"]
    assert report["rss_growth_after_first_round_mb"] == growth
