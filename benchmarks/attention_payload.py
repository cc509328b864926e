"""Bytes we store and send for an attention visualization, against BertViz's JSON.

BertViz puts ``json.dumps(attention.tolist())`` of the (layers, heads, T, T) tensor into its
page. We store float16 parts (zstd-compressed) and send one layer at a time as float16
bytes (gzip on the wire). Measured through the real app, for a 50-token input on:

- a 12-layer, 12-head BERT (BERT-base's shape; random weights, so its attention is close
  to uniform — the hardest case for compression),
- minilm-l6 (real weights, 6 x 12), and smollm2-135m (real weights, 30 x 9, causal).

Goal: ours / BertViz <= 1/10, for both stored and sent bytes.

    .venv/bin/python benchmarks/attention_payload.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from transformers import BertConfig

from tzoo.config import Settings
from tzoo.runtime import tiny
from tzoo.runtime.catalogue import ModelSpec, register_model
from tzoo.runtime.sources import Loaded, LoadOptions, TinySource
from tzoo.web.app import create_app

TEXT = (
    "Attention lets every token look back at the words that came before it, and the "
    "pattern of those looks tells us a surprising amount about what a model has learned."
)
N_TOKENS = 50


class BertBaseShape(TinySource):
    """BERT-base's attention shape (12 layers x 12 heads) with narrow random weights."""

    def __init__(self) -> None:
        super().__init__("bert")

    def load(self, options: LoadOptions) -> Loaded:
        config = BertConfig(
            vocab_size=tiny.build_config("bert").vocab_size,
            hidden_size=192,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=384,
            max_position_embeddings=512,
        )
        from transformers import AutoModel

        model = AutoModel.from_config(config, attn_implementation="eager").eval()
        return Loaded(model, tiny.build_tokenizer("bert"), "random BERT-base-shaped")


def text_of_tokens(client: TestClient, model: str, n: int) -> str:
    """A prefix of TEXT that is exactly ``n`` tokens for this model."""
    words = (TEXT + " ") * 20
    lo, hi = 1, len(words)
    while lo < hi:  # shortest prefix with >= n tokens
        mid = (lo + hi) // 2
        if count_tokens(client, model, words[:mid]) >= n:
            hi = mid
        else:
            lo = mid + 1
    return words[:lo]


def count_tokens(client: TestClient, model: str, text: str) -> int:
    manager = client.app.state.manager  # type: ignore[attr-defined]
    return len(manager.get(model).tokenizer(text)["input_ids"])


def measure(client: TestClient, model: str) -> dict[str, float]:
    text = text_of_tokens(client, model, N_TOKENS)
    created = client.post("/api/visualizations", json={"model_name": model, "text": text})
    created.raise_for_status()
    slug = created.json()["slug"]
    meta = client.get(f"/api/visualizations/{slug}").json()
    stack = next(iter(meta["stacks"]))
    layers, sent = [], 0
    for layer in range(meta["stacks"][stack]["n_layers"]):
        response = client.get(
            f"/api/visualizations/{slug}/attention",
            params={"layer": layer, "stack": stack, "format": "json"},
        )
        layers.append(np.asarray(response.json(), dtype=np.float32))
        binary = client.get(
            f"/api/visualizations/{slug}/attention",
            params={"layer": layer, "stack": stack},
            headers={"Accept-Encoding": "gzip"},
        )
        sent += binary.num_bytes_downloaded
    tensor = np.stack(layers)  # (layers, heads, T, T), as BertViz would hold it
    bertviz = len(json.dumps(tensor.tolist()))
    return {
        "shape": tensor.shape,
        "stored": attention_part_bytes(client, slug),
        "stored_total": meta["stored_bytes"],
        "sent": sent,
        "bertviz": bertviz,
    }


def attention_part_bytes(client: TestClient, slug: str) -> int:
    """Stored bytes of the attention tensor alone (BertViz's JSON holds nothing else)."""
    from sqlalchemy import func, select

    from tzoo.store.models import Artefact, ArtefactPart

    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        query = (
            select(func.sum(ArtefactPart.blob_bytes))
            .join(Artefact)
            .where(Artefact.slug == slug, ~ArtefactPart.name.contains(".neurons"))
            .where(~ArtefactPart.name.contains("position_bias"))
        )
        return int(session.scalar(query) or 0)


def main() -> None:
    register_model(
        ModelSpec("bert-base-shape", "12x12 random BERT", "encoder", BertBaseShape()), replace=True
    )
    with tempfile.TemporaryDirectory(prefix="tzoo-bench-") as tmp:
        settings = Settings(
            data_dir=Path(tmp), cache_dir=Path(tmp) / "cache", result_cache_ttl_seconds=0
        )
        with TestClient(create_app(settings)) as client:
            print(
                f"{'model':16} {'shape':>18} {'BertViz JSON':>13} {'stored':>10} {'ratio':>6} "
                f"{'sent':>10} {'ratio':>6} {'stored, all':>12}"
            )
            for model in ("bert-base-shape", "minilm-l6", "smollm2-135m"):
                r = measure(client, model)
                print(
                    f"{model:16} {r['shape']!s:>18} {r['bertviz']:>13,} {r['stored']:>10,} "
                    f"{r['stored'] / r['bertviz']:>6.3f} {r['sent']:>10,} {r['sent'] / r['bertviz']:>6.3f} "
                    f"{r['stored_total']:>12,}"
                )
    print("goal: ratio <= 0.100. 'stored' and 'sent' are the attention tensor (what BertViz's")
    print("JSON holds); 'stored, all' adds the neuron view's query/key vectors and the row.")


if __name__ == "__main__":
    main()
