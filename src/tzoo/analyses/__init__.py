"""Analyses: pure functions from a model handle and an input to a typed result (no I/O,
no web, no database)."""

# Imported eagerly, not through a lazy ``__getattr__``: the function ``attention`` shares
# its name with the module ``tzoo.analyses.attention``, and a lazy lookup would hand out
# the module once anything had imported it.
from tzoo.analyses.attention import (
    AttentionResult,
    AttentionStack,
    EmptyInputError,
    InputTooLongError,
    attention,
    display_tokens,
    head_statistics,
)

__all__ = [
    "AttentionResult",
    "AttentionStack",
    "EmptyInputError",
    "InputTooLongError",
    "attention",
    "display_tokens",
    "head_statistics",
]
