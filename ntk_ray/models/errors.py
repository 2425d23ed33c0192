"""The one error type of model loading: ``ModelError``, a one-line, user-facing problem with
--model, --adapter or the LoRA settings (the CLI prints it without a traceback), and
``first_line``, which shortens a library exception to the line such a message quotes."""

from __future__ import annotations


class ModelError(ValueError):
    """A one-line, user-facing problem with --model, --adapter or the LoRA settings."""


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (its type name when the message is empty)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
