"""Feature labels: prompts, answer parsing, detection scoring on known predictions, the
local explainer on tiny-llama (content meaningless, but a label comes back) and, marked
slow, on SmolLM2-135M-Instruct. The OpenAI-compatible client is tested against a live
local server in tests/integration/test_labels_endpoint.py."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from tzoo_testing import make_settings

from tzoo.analyses.corpus import shipped_corpus
from tzoo.circuits.features import (
    FeatureContext,
    FeatureDashboard,
    Histogram,
    TokenLogit,
    build_dashboards,
    detection_contexts,
)
from tzoo.circuits.labels import (
    DETECT_ONE_SYSTEM,
    DETECT_SYSTEM,
    EXPLAIN_EXAMPLE,
    EXPLAIN_SYSTEM,
    DetectionScore,
    ExplainerError,
    ExplainerResponseError,
    LocalExplainer,
    Message,
    OpenAICompatibleExplainer,
    detection_metrics,
    explain_feature,
    explainer_from_settings,
    explanation_prompt,
    parse_label,
    parse_predictions,
    score_detection,
)
from tzoo.circuits.transcoders import TranscoderConfig, TranscoderSet
from tzoo.runtime.hooks import run_with_cache
from tzoo.runtime.manager import ModelManager


def context(words: list[str], activations: list[float], document: int = 0) -> FeatureContext:
    index = max(range(len(words)), key=lambda i: activations[i])
    return FeatureContext(
        document=document,
        position=index,
        index=index,
        tokens=words,
        token_ids=list(range(len(words))),
        activations=activations,
    )


def comma_dashboard() -> FeatureDashboard:
    """A hand-made dashboard of a feature that fires on commas."""
    top = [
        context(["Hello", ",", " world"], [0.0, 2.0, 0.1]),
        context(["Yes", ",", " indeed", ","], [0.0, 1.5, 0.0, 0.2], document=1),
    ]
    return FeatureDashboard(
        model_name="test",
        layer=3,
        feature=7,
        n_tokens=100,
        n_active=10,
        frequency=0.1,
        max_activation=2.0,
        mean_activation=0.8,
        top_contexts=top,
        quantiles=[],
        top_logits=[TokenLogit(" and", 5, 1.5), TokenLogit(" but", 6, 1.2)],
        bottom_logits=[],
        histogram=Histogram([0.0, 1.0, 2.0], [6, 4]),
        logits_layer=3,
    )


class ScriptedExplainer:
    """Answers from a function of the (system, last user) messages; records every call as
    (system, last user message, max_tokens)."""

    name = "scripted"

    def __init__(self, answer: Callable[[str, str], object]) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str, int]] = []

    def complete(self, messages: Sequence[Message], *, max_tokens: int) -> str:
        system, user = messages[0]["content"], messages[-1]["content"]
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "user"
        self.calls.append((system, user, max_tokens))
        return str(self.answer(system, user))


def numbered_texts(user: str) -> list[str]:
    """The texts of a detection prompt, in order."""
    lines = user.split("Texts:\n", 1)[1].split("\n\n")[0].splitlines()
    return [line.split(". ", 1)[1] for line in lines]


# -- explaining -----------------------------------------------------------------------------


def test_explanation_prompt_marks_strong_tokens_and_lists_logits() -> None:
    messages = explanation_prompt(comma_dashboard())
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"] == EXPLAIN_SYSTEM
    assert messages[1:3] == [  # the worked example
        {"role": "user", "content": EXPLAIN_EXAMPLE[0]},
        {"role": "assistant", "content": "fruit names"},
    ]
    user = messages[-1]["content"]
    # >= 30% of the max (2.0) is marked; 0.1 and 0.2 are not.
    assert "1. Hello<<,>> world" in user
    assert "2. Yes<<,>> indeed," in user
    assert "more likely next: and, but" in user
    assert user.rstrip().endswith("Label:")


def test_explain_feature_parses_the_answer() -> None:
    explainer = ScriptedExplainer(lambda s, u: '\n  Label: "**Commas** between clauses."\nmore')
    assert explain_feature(comma_dashboard(), explainer) == "Commas between clauses"
    assert explainer.calls[0][2] == 32
    silent = ScriptedExplainer(lambda s, u: " \n\n")
    with pytest.raises(ExplainerResponseError, match="gave no label"):
        explain_feature(comma_dashboard(), silent)
    dead = FeatureDashboard.from_dict({**comma_dashboard().to_dict(), "top_contexts": []})
    with pytest.raises(ValueError, match="never fires"):
        explain_feature(dead, explainer)


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("commas", "commas"),
        ("<think>hmm, maybe dates</think>\nDates in 2020s.", "Dates in 2020s"),
        ("1. The label: «x»", "«x»"),
        ("The feature detects the following:\n1. cats and dogs", "cats and dogs"),
        ("This feature fires on plural nouns.", "plural nouns"),
        ("Names:", "Names:"),
        ("- Feature: words after <<the>>", "words after the"),
        ("Explanation: 'plural nouns'", "plural nouns"),
        ("\x1a\x1b ok", "ok"),
        ("2020s dates", "2020s dates"),
        ("bacteria and yeast, his, his, his, his", "bacteria and yeast, his"),
        ("cats, dogs, cats", "cats, dogs, cats"),
        ("", ""),
        ("word " * 60, ("word " * 24).strip()),
    ],
)
def test_parse_label(answer: str, label: str) -> None:
    assert parse_label(answer) == label


# -- detection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "n", "calls"),
    [
        ("[1, 0, 1]", 3, [True, False, True]),
        ("Sure! [1,0,1] is my answer for the 3 texts", 3, [True, False, True]),
        ("1, 0, 0, 1", 4, [True, False, False, True]),
        ("yes no Yes", 3, [True, False, True]),
        ("<think>[0, 0]</think>[1, 1]", 2, [True, True]),
        ("[1, 0]", 3, None),
        ("I cannot tell.", 2, None),
    ],
)
def test_parse_predictions(answer: str, n: int, calls: list[bool] | None) -> None:
    assert parse_predictions(answer, n) == calls


def test_detection_metrics_on_known_predictions() -> None:
    truth = [True, True, True, False, False]
    # TP 1; FN 2 (one a "no", one unanswered); FP 1; TN 1.
    predicted = [True, False, None, True, False]
    balanced, precision, recall = detection_metrics(truth, predicted)
    assert recall == pytest.approx(1 / 3)
    assert precision == pytest.approx(1 / 2)
    assert balanced == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert detection_metrics([True, False], [False, False]) == (0.5, 0.0, 0.0)
    assert detection_metrics([True, False], [True, False]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="both"):
        detection_metrics([True, True], [True, True])


def heldout() -> list[FeatureContext]:
    """Six activating contexts (with commas) and five silent ones."""
    firing = [context([f"Item {i}", ",", " next"], [0.0, 1.0 + i, 0.0], i) for i in range(6)]
    silent = [context([f"Plain text {i}", " here"], [0.0, 0.0], 10 + i) for i in range(5)]
    return firing + silent


def test_score_detection_with_a_perfect_and_a_partial_explainer() -> None:
    contexts = heldout()
    perfect = ScriptedExplainer(
        lambda s, u: str([int("," in t) for t in numbered_texts(u)]).replace(" ", "")
    )
    score = score_detection("commas", comma_dashboard(), contexts, perfect, contexts_per_prompt=4)
    assert (score.balanced_accuracy, score.precision, score.recall) == (1.0, 1.0, 1.0)
    assert (score.n_activating, score.n_non_activating, score.n_unanswered) == (6, 5, 0)
    assert (score.layer, score.feature, score.label) == (3, 7, "commas")
    # Three prompts of at most 4 texts, each with the label; all texts seen once, shuffled.
    assert [len(numbered_texts(u)) for _, u, _ in perfect.calls] == [4, 4, 3]
    assert all(s == DETECT_SYSTEM and "Label: commas" in u for s, u, _ in perfect.calls)
    seen = [t for _, u, _ in perfect.calls for t in numbered_texts(u)]
    assert sorted(seen) == sorted(c.text() for c in contexts)
    assert seen != [c.text() for c in contexts]
    assert [p.text for p in score.predictions] == seen
    assert all(p.activating == ("," in p.text) for p in score.predictions)

    # Says "fires" to every list; the second list answer cannot be read, so its four texts
    # are asked one at a time: "Yes.", "0", "hmm" (unreadable), "1 - it does".
    lists = iter(["[1,1,1,1]", "no idea", "[1, 1, 1]"])
    singles = iter(["Yes.", "0", "hmm", "1 - it does"])
    sloppy = ScriptedExplainer(lambda s, u: next(lists) if s == DETECT_SYSTEM else next(singles))
    score = score_detection("commas", comma_dashboard(), contexts, sloppy, contexts_per_prompt=4)
    systems = [s for s, _, _ in sloppy.calls]
    assert systems == [DETECT_SYSTEM] * 2 + [DETECT_ONE_SYSTEM] * 4 + [DETECT_SYSTEM]
    asked_alone = [u.split("Text: ", 1)[1] for s, u, _ in sloppy.calls[2:6]]
    assert asked_alone == [p.text for p in score.predictions[4:8]]
    assert [p.predicted for p in score.predictions[4:8]] == [True, False, None, True]
    assert score.n_unanswered == 1
    truth = [p.activating for p in score.predictions]
    calls = [p.predicted for p in score.predictions]
    assert (score.balanced_accuracy, score.precision, score.recall) == detection_metrics(
        truth, calls
    )
    again = DetectionScore.from_dict(json.loads(json.dumps(score.to_dict())))
    assert again == score


def test_score_detection_needs_both_kinds() -> None:
    explainer = ScriptedExplainer(lambda s, u: "[1]")
    with pytest.raises(ValueError, match="both kinds"):
        score_detection("x", comma_dashboard(), heldout()[:6], explainer)


# -- explainers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    return ModelManager(make_settings(tmp_path_factory.mktemp("labels")))


def test_local_explainer_gives_a_label_with_tiny_llama(manager: ModelManager) -> None:
    """tiny-llama has random weights and no chat template: the label means nothing, but the
    plumbing (prompt, greedy generation, no blank start, parsing) gives a non-empty one."""
    explainer = LocalExplainer(manager.get("tiny-llama"))
    start = time.perf_counter()
    label = explain_feature(comma_dashboard(), explainer, max_tokens=16)
    assert label.strip() and len(label) <= 120
    assert time.perf_counter() - start < 30
    # Greedy: the same prompt gives the same label.
    assert explain_feature(comma_dashboard(), explainer, max_tokens=16) == label


def test_a_prompt_longer_than_the_context_is_cut_in_the_middle(manager: ModelManager) -> None:
    """tiny-gpt2 reads at most 1024 positions: a longer labelling prompt keeps its start
    and its end (the question) and loses the middle, and generation still works."""
    handle = manager.get("tiny-gpt2")
    explainer = LocalExplainer(handle)
    long_text = "".join(chr(ord("a") + i % 26) for i in range(3000))  # one token a byte
    ids = handle.tokenizer(long_text)["input_ids"]
    fitted = explainer._fitted(ids, max_tokens=24)
    assert len(fitted) == 1024 - 24
    head = (1024 - 24) // 3
    assert fitted[:head] == ids[:head] and fitted[head:] == ids[len(ids) - (1000 - head) :]
    answer = explainer.complete([{"role": "user", "content": long_text}], max_tokens=24)
    assert isinstance(answer, str)
    with pytest.raises(ExplainerError, match="leaves no room"):
        explainer._fitted(ids, max_tokens=1000)


def test_explainer_from_settings(manager: ModelManager, tmp_path: Path) -> None:
    remote = explainer_from_settings(
        make_settings(tmp_path, autointerp_url="http://127.0.0.1:9/v1", autointerp_model="m"),
        manager,
    )
    assert isinstance(remote, OpenAICompatibleExplainer)
    assert remote.url == "http://127.0.0.1:9/v1/chat/completions" and remote.model == "m"
    remote.close()
    local = explainer_from_settings(make_settings(tmp_path, autointerp_model="tiny-llama"), manager)
    assert isinstance(local, LocalExplainer) and local.name == "tiny-llama"


@pytest.mark.slow
def test_smollm2_labels_a_feature(real_manager: ModelManager) -> None:
    """SmolLM2-135M-Instruct labels a random transcoder feature of its own layer 3 (biases
    set so that features fire on about 5% of tokens) from a dashboard built on the shipped
    corpus, and scores the label by detection on held-out
    paragraphs. Random features mean little, so only the mechanics are asserted; the
    label and score are printed (``-s``)."""
    handle = real_manager.get("smollm2-135m")
    config = TranscoderConfig(
        model_name=handle.name,
        kind="plt",
        d_model=handle.d_model,
        n_features=64,
        layers=(3,),
        n_model_layers=handle.n_layers,
    )
    transcoders = TranscoderSet(config, seed=0)
    texts = shipped_corpus()
    train, test = texts[:14], texts[14:]
    # Encoder biases that make every feature fire on about 5% of the training tokens.
    ids = handle.tokenizer(train[:4], return_tensors="pt", padding=True)
    _, cache = run_with_cache(handle, ids, sites=["mlp_in"], layers=[3], attentions=False)
    x = cache["decoder.3.mlp_in"][ids["attention_mask"].bool()]  # (tokens, d)
    with torch.no_grad():
        pre = transcoders.encode(3, x)  # (tokens, F), biases 0
        transcoders.b_enc[0].copy_(config.initial_threshold - pre.quantile(0.95, dim=0))
    dashboards = build_dashboards(handle, transcoders, train, quantiles=0, window=8)
    # A feature that fires, but not everywhere.
    key = min(dashboards, key=lambda k: abs(dashboards[k].frequency - 0.05))
    dashboard = dashboards[key]
    explainer = LocalExplainer(handle)
    start = time.perf_counter()
    label = explain_feature(dashboard, explainer)
    seconds = time.perf_counter() - start
    contexts = detection_contexts(
        handle, transcoders, test, *key, n_activating=5, n_non_activating=5, window=8
    )
    score = score_detection(label, dashboard, contexts, explainer)
    print(f"\nfeature {key}, frequency {dashboard.frequency:.3f}: {label!r} ({seconds:.1f} s)")
    print(f"  top logits: {[t.token for t in dashboard.top_logits]}")
    print(
        f"  detection: balanced accuracy {score.balanced_accuracy:.2f}, precision "
        f"{score.precision:.2f}, recall {score.recall:.2f}, unanswered {score.n_unanswered}"
    )
    assert label and len(label) <= 120
    assert score.n_activating + score.n_non_activating == len(contexts) >= 2
