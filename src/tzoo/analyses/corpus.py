"""Text to train and evaluate tuned lenses on, with no dataset hub in reach.

The corpus is the model's own writing: ``build_corpus`` samples the model (temperature 1,
no top-k or top-p cut, special tokens suppressed, exactly ``tokens_per_doc`` new tokens)
from the fixed ``SEED_PROMPTS``, document i from prompt i mod len(SEED_PROMPTS), 16 documents a
batch, after ``torch.manual_seed(seed)`` (default seed 0) in a forked random state. Sampled text is
exactly the distribution a lens is asked to predict, and the same (model, seed, size) gives
the same corpus, cached as JSON under ``TZOO_CACHE_DIR/corpus`` so the CLI and the tests
sample it once.

``shipped_corpus`` adds short texts written for this project (``tzoo/data/corpus``): natural
prose on varied topics, to hold out text the model did not write. ``split_corpus`` makes
a seeded train / held-out split.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from tzoo.analyses.tuned_lens import safe_name
from tzoo.config import get_settings
from tzoo.runtime.handle import ModelHandle

CORPUS_FORMAT_VERSION = 1
TEMPERATURE = 1.0
GENERATION_BATCH = 16  # documents sampled together (part of what fixes the corpus)
SEED_PROMPTS: tuple[str, ...] = (
    "The history of the city begins",
    "In the laboratory, the researchers measured",
    "Here is a simple recipe for bread:",
    "Dear Anna, thank you for your letter.",
    "The rules of chess are simple.",
    "def fibonacci(n):",
    "Yesterday the council voted to",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village by the sea,",
    "Q: Why is the sky blue?\nA:",
    "The three most important things to know about volcanoes are",
    "My favourite place to walk in autumn is",
    "The train left the station at seven o'clock,",
    "To install the package, open a terminal and",
    "In 1815, after the battle,",
    "A good night's sleep helps the brain",
)
ProgressFn = Callable[[int, int], None]  # (documents done, total)


def build_corpus(
    handle: ModelHandle,
    *,
    n_docs: int,
    tokens_per_doc: int,
    seed: int = 0,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
) -> list[str]:
    """``n_docs`` documents sampled from ``handle``'s model (see the module docstring), read
    from ``cache_dir`` (default ``TZOO_CACHE_DIR/corpus``) when sampled before. The caller
    holds the model."""
    if n_docs < 1 or tokens_per_doc < 1:
        raise ValueError("n_docs and tokens_per_doc must be at least 1.")
    if handle.architecture != "decoder":
        raise ValueError(f"Sampling a corpus needs a decoder model; {handle.name} is not one.")
    directory = cache_dir or get_settings().cache_dir / "corpus"
    path = directory / f"{safe_name(handle.name)}-seed{seed}-{n_docs}x{tokens_per_doc}.json"
    cached = _read_cached(path, handle.name, seed, n_docs, tokens_per_doc)
    if cached is not None:
        return cached
    docs: list[str] = []
    prompts = [SEED_PROMPTS[i % len(SEED_PROMPTS)] for i in range(n_docs)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, n_docs, GENERATION_BATCH):
            docs += _sample(handle, prompts[start : start + GENERATION_BATCH], tokens_per_doc)
            if progress is not None:
                progress(len(docs), n_docs)
    _write_cached(path, handle.name, seed, tokens_per_doc, docs)
    return docs


def shipped_corpus() -> list[str]:
    """The paragraphs of the texts shipped in ``tzoo/data/corpus`` (blank-line separated),
    file by file in name order."""
    folder = resources.files("tzoo").joinpath("data", "corpus")
    paragraphs: list[str] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".txt"):
            text = entry.read_text(encoding="utf-8")
            paragraphs += [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    return paragraphs


def split_corpus(
    corpus: Sequence[str], heldout_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(train, held-out): a seeded shuffle, at least one document on each side."""
    if len(corpus) < 2:
        raise ValueError("A corpus needs at least 2 documents to split.")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1); got {heldout_fraction}.")
    order = list(range(len(corpus)))
    random.Random(seed).shuffle(order)
    n_heldout = min(len(corpus) - 1, max(1, round(len(corpus) * heldout_fraction)))
    heldout = sorted(order[:n_heldout])
    train = sorted(order[n_heldout:])
    return [corpus[i] for i in train], [corpus[i] for i in heldout]


@torch.no_grad()
def _sample(handle: ModelHandle, prompts: list[str], n_tokens: int) -> list[str]:
    """One document per prompt: the prompt and ``n_tokens`` sampled tokens, decoded."""
    tokenizer = handle.tokenizer
    encoded = [[int(i) for i in tokenizer(p)["input_ids"]] for p in prompts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Left padding, masked: every row's next token comes right after its prompt.
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
    device = next(handle.model.parameters()).device
    config = GenerationConfig(
        do_sample=True,
        temperature=TEMPERATURE,
        top_k=0,
        top_p=1.0,
        max_new_tokens=n_tokens,
        min_new_tokens=n_tokens,
        suppress_tokens=sorted(set(tokenizer.all_special_ids)),
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    generate: Any = handle.model.generate
    out = generate(
        input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config
    )
    new = out[:, width:].cpu().tolist()
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [prompt + text for prompt, text in zip(prompts, texts, strict=True)]


def _read_cached(
    path: Path, model: str, seed: int, n_docs: int, tokens_per_doc: int
) -> list[str] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    expected = {
        "version": CORPUS_FORMAT_VERSION,
        "model": model,
        "seed": seed,
        "tokens_per_doc": tokens_per_doc,
    }
    if any(data.get(key) != value for key, value in expected.items()):
        return None
    docs = data.get("documents")
    if not isinstance(docs, list) or len(docs) != n_docs:
        return None
    return [str(doc) for doc in docs]


def _write_cached(path: Path, model: str, seed: int, tokens_per_doc: int, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "version": CORPUS_FORMAT_VERSION,
        "model": model,
        "seed": seed,
        "tokens_per_doc": tokens_per_doc,
        "temperature": TEMPERATURE,
        "prompts": list(SEED_PROMPTS),
        "documents": docs,
    }
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    partial.replace(path)
