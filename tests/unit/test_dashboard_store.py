"""Feature dashboards encoded as arrays come back exactly as ``FeatureDashboard.to_dict()``
gave them, for a busy feature and for one that never fired."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tzoo_testing import make_settings

from tzoo.analyses.corpus import shipped_corpus
from tzoo.circuits.features import build_dashboards
from tzoo.circuits.transcoders import TranscoderConfig, TranscoderSet
from tzoo.runtime.manager import ModelManager
from tzoo.service.dashboards import dashboard_key, decode_dashboard, encode_dashboard
from tzoo.store.codec import decode_arrays, encode_arrays


@pytest.fixture(scope="module")
def dashboards(tmp_path_factory: pytest.TempPathFactory) -> dict[Any, Any]:
    manager = ModelManager(make_settings(Path(tmp_path_factory.mktemp("dashboards"))))
    handle = manager.get("tiny-gpt2")
    config = TranscoderConfig(
        model_name="tiny-gpt2", kind="plt", d_model=64, n_features=8, layers=(0,), n_model_layers=2
    )
    transcoders = TranscoderSet(config, seed=3)
    with torch.no_grad():
        transcoders.b_enc[0][0] = 5.0  # feature 0 fires nearly everywhere
        transcoders.b_enc[0][1] = -50.0  # feature 1 never does
    return build_dashboards(handle, transcoders, shipped_corpus()[:6], features={0: [0, 1]})


@pytest.mark.parametrize("feature", [0, 1])
def test_a_dashboard_survives_encoding(dashboards: dict[Any, Any], feature: int) -> None:
    original = json.loads(json.dumps(dashboards[(0, feature)].to_dict()))
    params, arrays = encode_dashboard(original)
    # Through the codec and JSON, as the store keeps them.
    stored = decode_arrays(encode_arrays(arrays, precision="float32"))
    again = decode_dashboard(json.loads(json.dumps(params)), stored)
    assert again == original
    if feature == 0:
        assert original["top_contexts"] and any(q["contexts"] for q in original["quantiles"])
    else:
        assert original["n_active"] == 0 and not original["top_contexts"]


def test_keys_differ_when_any_input_does() -> None:
    base = {"model": "m", "layer": 0, "feature": 3, "options": {"a": 1}}
    key = dashboard_key(**base)
    assert len(key) == 64 and key == dashboard_key(**dict(reversed(base.items())))
    for change in ({"layer": 1}, {"feature": 4}, {"options": {"a": 2}}, {"model": "n"}):
        assert dashboard_key(**(base | change)) != key
