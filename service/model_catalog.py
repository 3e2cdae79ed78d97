"""What the served models are: each one's identity and settings, and a hash of everything
that determines a reward, which every response carries so that a trainer can tell when
the reward it optimises has changed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from service.combine import CombineMode
from service.config import RewardConfig
from service.models import RewardModel


class ModelCatalog:
    def __init__(self, models: Sequence[RewardModel], config: RewardConfig) -> None:
        self._models = list(models)
        self._config = config
        self._definitions: dict[CombineMode, str] = {}

    def reward_definition(self, mode: CombineMode) -> str:
        """A hash of everything that determines a reward: models, versions, parameters.

        Fixed for the engine's life, so hashed once per mode: every response carries it."""
        if mode not in self._definitions:
            self._definitions[mode] = self._hash_definition(mode)
        return self._definitions[mode]

    def _hash_definition(self, mode: CombineMode) -> str:
        definition = {
            "models": [(m.name, m.kind, m.role, m.fingerprint) for m in self._models],
            "holistic": asdict(self._config.holistic_params()),
            "aspects": [asdict(a) for a in self._config.aspect_params()],
            "mode": mode.value,
        }
        digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
        return f"sha256:{digest}"

    def describe_models(self) -> list[dict[str, Any]]:
        """Each model's identity and settings; aspects also say what one raw value covers
        (granularity), which way is better (direction) and how segments make one value."""
        declared: dict[str, dict[str, Any]] = {
            self._config.holistic.name: {"granularity": "sequence", "direction": "higher"}
        }
        for aspect in self._config.aspects:
            declared[aspect.name] = {
                "granularity": aspect.granularity,
                "direction": aspect.selection_direction,
                "aggregate": aspect.aggregate,
            }
        return [
            {
                "name": m.name,
                "role": m.role,
                "kind": m.kind,
                "device": m.device,
                "fingerprint": m.fingerprint,
                "details": {**declared[m.name], **m.describe()},
            }
            for m in self._models
        ]
