"""Where grammar errors come from: the built-in proselint checks, or a plugged-in callable.

A checker maps a text to its error spans, `(start, end)` character offsets into that text.
proselint is the built-in one because it installs from PyPI and runs offline with no
download at run time, and it reports character offsets itself; any other checker
(LanguageTool, a model, ...) plugs in as `checker: "package.module:callable"`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import version

from service.errors import ConfigError

Span = tuple[int, int]
Checker = Callable[[str], Iterable[Sequence[int]]]


class ProselintChecker:
    """proselint's checks whose path is, or starts with, one of `prefixes`."""

    def __init__(self, prefixes: Sequence[str]) -> None:
        from proselint.checks import __register__ as all_checks

        unknown = [p for p in prefixes if not any(c.matches_partial(p) for c in all_checks)]
        if unknown:
            raise ConfigError(f"proselint_checks: no proselint check is named {unknown}")
        self._checks = tuple(c for c in all_checks if any(c.matches_partial(p) for p in prefixes))
        self.version = f"proselint=={version('proselint')}"

    def __call__(self, text: str) -> list[Span]:
        from proselint.tools import LintFile

        if not text:
            return []
        # LintFile pads the text with one newline on each side, so offsets shift by one;
        # it also knows where quotations are, which proselint leaves unchecked.
        lint_file = LintFile("<response>", text)
        return [
            (_clamp(result.span[0] - 1, len(text)), _clamp(result.span[1] - 1, len(text)))
            for check in self._checks
            for result in check.check_with_flags(lint_file.content)
            if check.flags.allow_quotes or not lint_file.is_quoted_pos(result.span[0])
        ]


def _clamp(offset: int, length: int) -> int:
    # A match may take in a padding newline; its span still has to fit the text itself.
    return min(max(offset, 0), length)


def import_checker(reference: str) -> Checker:
    """The callable named by 'package.module:attribute' (attribute may be dotted)."""
    module_name, _, attribute = reference.partition(":")
    try:
        target: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"checker: cannot import {reference!r}: {exc}") from exc
    if not callable(target):
        raise ConfigError(f"checker: {reference!r} is not callable")
    return target  # type: ignore[return-value]  # its signature is checked on every call
