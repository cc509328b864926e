"""The tools the home page lists. Each later analysis adds its entry here with its page."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tool:
    key: str
    title: str
    summary: str
    path: str | None  # None until its page exists


TOOLS: list[Tool] = [
    Tool(
        "attention",
        "Attention explorer",
        "Head, model and neuron views of every layer's attention, at permanent links.",
        "/#visualize",
    ),
    Tool(
        "wheel",
        "Token wheel",
        "Watch the next-token distribution and sample from it one token at a time.",
        "/wheel",
    ),
    Tool(
        "lenses",
        "Lenses and activations in words",
        "Logit lens, tuned lens and Patchscope explanations for every layer and token.",
        "/lens",
    ),
    Tool(
        "circuits",
        "Circuits",
        "Transcoders, attribution graphs and feature labels for a prompt's computation.",
        "/graph",
    ),
    Tool(
        "validate",
        "Validation suite",
        "Tiered checks that a transformer you built yourself is sound.",
        "/validate",
    ),
    Tool("api", "REST API", "Every analysis over HTTP, documented with OpenAPI.", "/docs"),
]
