"""Every tier on the well-formed models: nothing fails, and each check either passes, warns
for a reason that holds for random weights, or says why it does not apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tzoo_testing import make_settings
from validation_zoo import tiny_causal_lm

from tzoo.runtime.manager import ModelManager
from tzoo.validation import load_subject, registered, validate

ALL_CHECKS = {spec.name for spec in registered()}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    # Tiny models: threads only add contention on a 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    return ModelManager(make_settings(Path(tmp_path_factory.mktemp("validation-e2e"))))


def test_a_plain_transformer_encoder_lm_passes_every_check() -> None:
    model = tiny_causal_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = validate(model, tiers=(1, 2, 3, 4))
    assert set(report.names()) == ALL_CHECKS
    assert report.counts()["pass"] == len(ALL_CHECKS), report.to_markdown()
    # Checks that train work on copies: the model is as it was.
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not model.training


# Warnings a random-weight model earns honestly: its heads are near-uniform, and llama's
# all-zero pad embedding makes Integrated Gradients' path steep near the baseline.
EXPECTED_WARNINGS = {
    "tiny-gpt2": {"attention_stats"},
    "tiny-llama": {"attention_stats", "integrated_gradients"},
    "tiny-bert": {"attention_stats"},
    "tiny-t5": set(),
}
# tiny-bert is a bare encoder: not causal, and no language-model head to train.
EXPECTED_SKIPS = {
    "tiny-bert": {
        "causality",
        "overfit_one_batch",
        "finetune",
        "hyperparameter_search",
        "benchmarks",
        "config_roundtrip",
    },
}


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-t5"])
def test_the_tiny_hugging_face_models_pass_what_applies(manager: ModelManager, name: str) -> None:
    report = validate(load_subject(name, manager=manager), tiers=(1, 2, 3, 4))
    assert report.ok, report.to_markdown()
    statuses = {r.name: r.status for r in report.results}
    assert {n for n, s in statuses.items() if s == "warn"} <= EXPECTED_WARNINGS[name]
    assert {n for n, s in statuses.items() if s == "skip"} == EXPECTED_SKIPS.get(name, set())
    assert report.to_dataframe().shape == (len(ALL_CHECKS), 7)
