"""A bounded LRU of one model's outputs, keyed by a digest of (prompt, response)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Generic, TypeVar

V = TypeVar("V")


def item_key(prompt: str, response: str) -> bytes:
    """A 128-bit digest of the pair: the cache never holds the texts themselves.

    Both lengths are hashed first, so ("ab", "c") and ("a", "bc") cannot collide.
    """
    prompt_bytes = prompt.encode("utf-8", "surrogatepass")
    response_bytes = response.encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(digest_size=16)
    digest.update(len(prompt_bytes).to_bytes(8, "little"))
    digest.update(len(response_bytes).to_bytes(8, "little"))
    digest.update(prompt_bytes)
    digest.update(response_bytes)
    return digest.digest()


class ScoreCache(Generic[V]):
    """Outputs of one loaded model. Models are deterministic and batch-invariant in float32
    (in half precision to the kernels' rounding), so a retried or repeated item gets the
    same reward without another forward pass."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._entries: OrderedDict[bytes, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: bytes, value: V) -> None:
        if self.max_items <= 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_items:
            self._entries.popitem(last=False)
