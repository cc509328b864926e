"""Validation of user-built transformers, in tiers (see ``runner.validate``)."""

from tzoo.validation.registry import (
    CheckContext,
    Outcome,
    SkipCheck,
    ValidationOptions,
    register,
    registered,
)
from tzoo.validation.report import CheckResult, ValidationReport
from tzoo.validation.runner import validate
from tzoo.validation.subject import (
    ModelCodeError,
    Subject,
    UntrustedCodeError,
    attention_patterns,
    capture_attention,
    detect_device,
    detect_vocab_size,
    load_subject,
    subject_from_module,
    unwrap_logits,
)

__all__ = [
    "CheckContext",
    "CheckResult",
    "ModelCodeError",
    "Outcome",
    "SkipCheck",
    "Subject",
    "UntrustedCodeError",
    "ValidationOptions",
    "ValidationReport",
    "attention_patterns",
    "capture_attention",
    "detect_device",
    "detect_vocab_size",
    "load_subject",
    "register",
    "registered",
    "subject_from_module",
    "unwrap_logits",
    "validate",
]
