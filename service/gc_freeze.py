"""Keep the cyclic garbage collector's full passes short: freeze what start-up built.

A full (generation 2) collection walks every tracked object. With the models, tokenizers
and app loaded, one took 350 to 400 ms on the 2-CPU VM (the benchmark's config, at 64
clients), holding the GIL the whole time: the event loop, the tokenizer threads and the
device threads all stopped. Objects frozen once the models are warm are never walked
again; whatever requests create is collected as before (freed by reference counting or by
the collector's passes over what is not frozen).
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> int:
    """Collect start-up's garbage, then take every surviving object out of the collector's
    generations. Returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def unfreeze_startup_objects() -> None:
    """Hand frozen objects back to the collector (at shutdown: a process that builds a new
    app, such as a test run, must not keep the old one's cycles uncollectable)."""
    gc.unfreeze()
