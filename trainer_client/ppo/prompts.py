"""The prompt a policy sees: chat-templated, and cut to fit without losing the template.

Truncating the templated text at its end would drop the assistant header that tells the
policy to answer, so it would carry on writing the prompt's passage instead; cutting the
text at its start would drop the system turn and the question. The user's content is cut
at its end instead, and the service is sent that same cut prompt, the one the policy saw.
"""

from __future__ import annotations

from typing import Any


def templated(tokenizer: Any, prompt: str) -> str:
    """The text the policy is given for `prompt`: its chat template's user turn and the
    assistant header, or the prompt itself for a tokenizer without a template."""
    if tokenizer.chat_template:
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        )
    return prompt


def templated_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The policy's tokens for `prompt` (a template brings its own special tokens)."""
    text = templated(tokenizer, prompt)
    ids: list[int] = tokenizer(text, add_special_tokens=not tokenizer.chat_template)["input_ids"]
    return ids


def fit_prompt(tokenizer: Any, prompt: str, max_tokens: int) -> str:
    """`prompt`, cut at its end until its templated tokens number at most `max_tokens`."""
    excess = len(templated_ids(tokenizer, prompt)) - max_tokens
    if excess <= 0:
        return prompt
    content = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    keep = max(len(content) - excess, 0)
    while True:
        cut = str(tokenizer.decode(content[:keep], skip_special_tokens=True))
        over = len(templated_ids(tokenizer, cut)) - max_tokens
        if over <= 0:
            return cut
        if keep == 0:
            break
        # Decoding and encoding again can merge or split a token or two: step by what is
        # over, or by one token where that would overshoot the start.
        keep = keep - over if keep > over else keep - 1
    template_only = len(templated_ids(tokenizer, ""))
    raise ValueError(
        f"max_prompt_tokens={max_tokens} leaves no room for a prompt: the chat template "
        f"alone takes {template_only} tokens"
    )
