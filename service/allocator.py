"""Which malloc serves the process: TCMalloc where the machine has it, else the C library's.

The forwards allocate and free hundreds of tensors each, from two device threads at once,
beside the event loop and the tokenizer threads. glibc's malloc, kept to one heap so that
freed activations are reused (`service.memory`), serves them all from that heap and its
one lock; TCMalloc serves each thread from a cache of its own. Measured on this project's
CPU benchmark (HISTORY.md, session 30; two servers up at once, alternating 5 s rounds):
1.021x items/s at one single-item client, 1.026x at 64, 1.017x at 256 and 1.020x at 8
clients of 16 items, and 0.8 GB resident after a minute of mixed load against 1.5 GB. The
in-process limits did not rise with it (two short runs each). PyTorch's own CPU launcher
(`torch.backends.xeon.run_cpu`) preloads it too, by default.

A malloc can only be swapped before the process starts, so `alarm-serve serve` runs itself
again once with the library in LD_PRELOAD (`run_again_with_tcmalloc`), and `alarm-serve ray`
starts its replicas with it (`preload_environment`). The choice comes
from ALARM_ALLOCATOR: `auto` (the default: TCMalloc if found), `tcmalloc` (fails if not
found) or `system`. Debian and Ubuntu ship it as libtcmalloc-minimal4, conda as gperftools.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

CHOICE_ENV = "ALARM_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "system")
# Set in the environment of the process run again, so that it never runs itself a third time.
_RUN_AGAIN_ENV = "ALARM_ALLOCATOR_PRELOADED"
_LIBRARY_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")


class AllocatorError(RuntimeError):
    """ALARM_ALLOCATOR names an allocator this machine does not have, or no allocator."""


def _library_dirs() -> list[Path]:
    machine = os.uname().machine
    return [
        Path(sys.prefix) / "lib",  # conda's gperftools
        Path(f"/usr/lib/{machine}-linux-gnu"),
        Path("/usr/lib64"),
        Path("/usr/lib"),
        Path("/usr/local/lib"),
    ]


def find_tcmalloc() -> Path | None:
    """The TCMalloc shared library installed on this machine, if any."""
    for directory in _library_dirs():
        for name in _LIBRARY_NAMES:
            if (directory / name).is_file():
                return directory / name
    return None


def loaded_allocator(pid: int | str = "self") -> str:
    """`tcmalloc`, `jemalloc` or `system`: the malloc a (Linux) process has mapped."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"


def chosen_allocator() -> str:
    """ALARM_ALLOCATOR's value (`auto` when unset); AllocatorError for anything unknown."""
    choice = os.environ.get(CHOICE_ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise AllocatorError(f"{CHOICE_ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    return choice


def preload_environment() -> dict[str, str]:
    """Variables that start a new process on TCMalloc, as ALARM_ALLOCATOR chooses: for this
    process run again, or for one started elsewhere (a Ray replica), which then calls
    `confirm_preloaded`. Empty where the choice is `system`, or `auto` and no library is
    installed; AllocatorError where it is `tcmalloc` and none is."""
    choice = chosen_allocator()
    if choice == "system":
        return {}
    library = find_tcmalloc()
    if library is None:
        if choice == "tcmalloc":
            raise AllocatorError(
                f"{CHOICE_ENV}=tcmalloc, but no TCMalloc library was found "
                "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4)"
            )
        return {}
    return {
        "LD_PRELOAD": f"{library} {os.environ.get('LD_PRELOAD', '')}".strip(),
        CHOICE_ENV: choice,
        _RUN_AGAIN_ENV: str(library),
    }


def confirm_preloaded() -> bool:
    """In a process started with `preload_environment`: False where the library was
    preloaded and the C library's malloc still serves (the loader refused it), after a
    warning, or AllocatorError under `tcmalloc`. True otherwise. The marker variable is
    taken out of the environment, so that this process's children may try for themselves."""
    tried = os.environ.pop(_RUN_AGAIN_ENV, None)
    if not tried or loaded_allocator() != "system":
        return True
    message = f"preloading {tried} did not take: the C library's malloc serves"
    if chosen_allocator() == "tcmalloc":
        raise AllocatorError(message)
    log.warning(message)
    return False


def run_again_with_tcmalloc() -> None:
    """Replace this process by itself with TCMalloc preloaded, when ALARM_ALLOCATOR asks for
    it (`auto`: where the library is installed) and another malloc serves it now. Returns
    only where nothing is to be done; call it before any thread starts."""
    if not confirm_preloaded():  # run again already: never a third time
        return
    if chosen_allocator() == "system" or loaded_allocator() != "system":
        return
    variables = preload_environment()
    if not variables:
        return
    os.environ.update(variables)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
