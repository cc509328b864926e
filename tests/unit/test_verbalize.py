"""Patchscope verbalisation on the tiny models, against a direct computation written with
plain PyTorch forward hooks and a greedy loop that recomputes the whole sequence."""

from __future__ import annotations

import importlib
import json
import threading
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn
from tzoo_testing import make_settings

from tzoo.analyses import EmptyInputError, InputTooLongError, display_tokens
from tzoo.analyses.verbalize import (
    DEFAULT_IDENTITY_PROMPT,
    NotADecoderError,
    VerbalizeResult,
    VerbalizeRow,
    explanation_of,
    verbalize,
)
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelManager

# The module itself: ``tzoo.analyses.verbalize`` may one day name the function instead.
verbalize_module = importlib.import_module("tzoo.analyses.verbalize")
CAUSAL = ["tiny-gpt2", "tiny-llama"]
TEXT = "The cat sat on the mat."  # 23 byte tokens (24 with llama's <s>)
ATOL = 1e-5


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    return ModelManager(make_settings(tmp_path_factory.mktemp("verbalize")))


# -- a direct computation, no tzoo hooks, no key/value cache --------------------------------


def blocks(handle: ModelHandle) -> nn.ModuleList:
    base: Any = handle.model.base_model
    return base.h if handle.family == "gpt2" else base.layers


def final_norm(handle: ModelHandle) -> nn.Module:
    base: Any = handle.model.base_model
    return base.ln_f if handle.family == "gpt2" else base.norm


def first_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def source_residual(handle: ModelHandle, ids: list[int], layer: int) -> torch.Tensor:
    """(T, d) output of block ``layer``, read by a forward hook on the block."""
    seen: list[torch.Tensor] = []
    hook = blocks(handle)[layer].register_forward_hook(
        lambda _m, _a, out: seen.append(first_of(out)[0].clone())
    )
    try:
        with torch.no_grad():
            handle.model(torch.tensor([ids]), use_cache=False)
    finally:
        hook.remove()
    return seen[0]


def patched_greedy(
    handle: ModelHandle,
    vector: torch.Tensor | None,
    target: int,
    steps: int,
    prompt_text: str = DEFAULT_IDENTITY_PROMPT,
) -> tuple[torch.Tensor, str]:
    """The first-step log-probabilities (V,) and the decoded greedy continuation of the
    identity prompt, its placeholder's block-``target`` output replaced by ``vector``
    (None: unpatched) on every full recomputation."""
    prompt = handle.tokenizer(prompt_text)["input_ids"]
    slot = len(prompt) - 1

    def replace(_m: nn.Module, _a: Any, out: Any) -> Any:
        assert vector is not None
        hidden = first_of(out).clone()
        hidden[:, slot] = vector
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    hook = blocks(handle)[target].register_forward_hook(replace) if vector is not None else None
    ids, first = list(prompt), None
    eos = handle.tokenizer.eos_token_id
    try:
        with torch.no_grad():
            for _ in range(steps):
                logits = handle.model(torch.tensor([ids]), use_cache=False).logits[0, -1]
                log_probs = torch.log_softmax(logits.double(), dim=-1)
                first = log_probs if first is None else first
                token = int(log_probs.argmax())
                if token == eos:
                    break
                ids.append(token)
    finally:
        if hook is not None:
            hook.remove()
    assert first is not None
    return first, handle.tokenizer.decode(ids[len(prompt) :], skip_special_tokens=True)


def own_log_probs(handle: ModelHandle, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = handle.model(torch.tensor([ids]), use_cache=False).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)  # (T, V)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p.exp() * (p - q)).sum())


def entropy(q: torch.Tensor) -> float:
    return float(-(q.exp() * q).sum())


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# -- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize(("layer", "target"), [(0, None), (0, 1), (1, 0), (-1, None)])
def test_rows_match_a_direct_computation(
    manager: ModelManager, name: str, layer: int, target: int | None
) -> None:
    handle = manager.get(name)
    ids = handle.tokenizer(TEXT)["input_ids"]
    result = verbalize(handle, TEXT, layer=layer, target_layer=target, positions=[1, 5, -1])
    source_layer, target_layer = layer % 2, (layer if target is None else target) % 2
    assert (result.source_layer, result.target_layer) == (source_layer, target_layer)
    own = own_log_probs(handle, ids)
    for row, position in zip(result.rows, [1, 5, len(ids) - 1], strict=True):
        h = source_residual(handle, ids, source_layer)[position]  # (d,)
        first, continuation = patched_greedy(handle, h, target_layer, result.max_new_tokens)
        assert row.position == position
        assert row.token == display_tokens(handle.tokenizer, ids)[position]
        assert row.explanation == explanation_of(continuation)
        assert row.kl == pytest.approx(kl(own[position], first), abs=ATOL)
        assert row.entropy == pytest.approx(entropy(first), abs=ATOL)
        with torch.no_grad():
            lens = torch.softmax(handle.model.lm_head(final_norm(handle)(h)).double(), dim=-1)
        top = lens.topk(5)
        assert [t for t, _ in row.lens_top] == display_tokens(
            handle.tokenizer, top.indices.tolist()
        )
        assert [p for _, p in row.lens_top] == pytest.approx(top.values.tolist(), abs=ATOL)


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("prompt", ["?", "x -> x; ?"])
def test_short_identity_prompts_match_a_direct_computation(
    manager: ModelManager, name: str, prompt: str
) -> None:
    """ "?" alone is one token for GPT-2 (no prefix to cache), two for llama ("<s>?")."""
    handle = manager.get(name)
    ids = handle.tokenizer(TEXT)["input_ids"]
    result = verbalize(handle, TEXT, layer=0, identity_prompt=prompt, positions=[2, 7])
    own = own_log_probs(handle, ids)
    for row in result.rows:
        h = source_residual(handle, ids, 0)[row.position]
        first, continuation = patched_greedy(handle, h, 0, result.max_new_tokens, prompt)
        assert row.explanation == explanation_of(continuation)
        assert row.kl == pytest.approx(kl(own[row.position], first), abs=ATOL)


@pytest.mark.parametrize("name", CAUSAL)
def test_the_cached_prefix_equals_running_the_whole_prompt(
    manager: ModelManager, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = manager.get(name)
    prompt_ids = handle.tokenizer(DEFAULT_IDENTITY_PROMPT)["input_ids"]
    assert verbalize_module._Prompt.of(handle, prompt_ids).prefix_cache is not None
    cached = verbalize(handle, TEXT, layer=1, target_layer=0)
    whole_prompt = verbalize_module._Prompt.of  # a cache it cannot copy: no prefix reuse
    monkeypatch.setattr(
        verbalize_module._Prompt,
        "of",
        classmethod(lambda _cls, h, ids: replace(whole_prompt(h, ids), prefix_cache=None)),
    )
    whole = verbalize(handle, TEXT, layer=1, target_layer=0)
    for a, b in zip(cached.rows, whole.rows, strict=True):
        assert a.explanation == b.explanation
        assert a.kl == pytest.approx(b.kl, abs=ATOL)
        assert a.entropy == pytest.approx(b.entropy, abs=ATOL)


@pytest.mark.parametrize("name", CAUSAL)
def test_the_last_layer_lens_and_kl_are_the_models_own_output(
    manager: ModelManager, name: str
) -> None:
    """After the last block, the lens is the model's output, and the patched placeholder's
    next-token distribution is the source position's: KL 0."""
    handle = manager.get(name)
    ids = handle.tokenizer(TEXT)["input_ids"]
    own = own_log_probs(handle, ids).exp()
    result = verbalize(handle, TEXT, layer=-1)
    for row in result.rows:
        top = own[row.position].topk(5)
        assert [p for _, p in row.lens_top] == pytest.approx(top.values.tolist(), abs=ATOL)
        assert row.kl == pytest.approx(0.0, abs=ATOL)


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("layer", [0, 1])
def test_lens_top_agrees_with_the_logit_lens(manager: ModelManager, name: str, layer: int) -> None:
    lens = pytest.importorskip("tzoo.analyses.lens")
    handle = manager.get(name)
    result = verbalize(handle, TEXT, layer=layer)
    expected = lens.logit_lens(handle, TEXT, k=5)
    for row in result.rows:
        ids = expected.top_ids[layer + 1, row.position]  # lens layer 0 is the embedding
        assert [t for t, _ in row.lens_top] == [expected.token_strings[int(i)] for i in ids]
        probs = expected.top_probs[layer + 1, row.position]
        assert [p for _, p in row.lens_top] == pytest.approx(probs.tolist(), abs=ATOL)


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("layer", [0, 1])
def test_patching_the_prompts_own_residual_reproduces_the_unpatched_run(
    manager: ModelManager, name: str, layer: int
) -> None:
    """The identity prompt as the source text: its own residual at the placeholder, written
    back in place, leaves the run as it was."""
    handle = manager.get(name)
    result = verbalize(handle, DEFAULT_IDENTITY_PROMPT, layer=layer, positions=[-1])
    (row,) = result.rows
    first, continuation = patched_greedy(handle, None, layer, result.max_new_tokens)
    assert row.explanation == explanation_of(continuation)
    assert row.entropy == pytest.approx(entropy(first), abs=ATOL)
    assert row.kl == pytest.approx(0.0, abs=ATOL)


@pytest.mark.parametrize("name", CAUSAL)
def test_the_patch_changes_the_target_run(manager: ModelManager, name: str) -> None:
    handle = manager.get(name)
    ids = handle.tokenizer(TEXT)["input_ids"]
    unpatched, _ = patched_greedy(handle, None, 0, 1)
    own = own_log_probs(handle, ids)
    result = verbalize(handle, TEXT, layer=0)
    for row in result.rows:
        assert abs(row.entropy - entropy(unpatched)) > 1e-4
        assert abs(row.kl - kl(own[row.position], unpatched)) > 1e-4
    assert len({row.explanation for row in result.rows}) > 1


@pytest.mark.parametrize("name", CAUSAL)
def test_batched_equals_one_at_a_time(manager: ModelManager, name: str) -> None:
    handle = manager.get(name)
    batched = verbalize(handle, TEXT, layer=0, batch_size=8)  # 3 batches, the last short
    single = verbalize(handle, TEXT, layer=0, batch_size=1)
    assert len(batched.rows) == len(single.rows) == len(batched.tokens)
    for a, b in zip(batched.rows, single.rows, strict=True):
        assert (a.position, a.token, a.explanation) == (b.position, b.token, b.explanation)
        assert a.kl == pytest.approx(b.kl, abs=ATOL)
        assert a.entropy == pytest.approx(b.entropy, abs=ATOL)
        assert [t for t, _ in a.lens_top] == [t for t, _ in b.lens_top]


def test_positions_pick_rows_in_order_without_repeats(manager: ModelManager) -> None:
    handle = manager.get("tiny-gpt2")
    full = verbalize(handle, TEXT, layer=1)
    some = verbalize(handle, TEXT, layer=1, positions=[3, -1, 3, 0])
    last = len(full.tokens) - 1
    assert [row.position for row in some.rows] == [3, last, 0]
    for row in some.rows:
        expected = full.rows[row.position]
        assert (row.token, row.explanation) == (expected.token, expected.explanation)
        assert row.kl == pytest.approx(expected.kl, abs=ATOL)
    assert some.tokens == full.tokens and some.complete


# -- progress, cancellation, the lock, hooks ------------------------------------------------


def test_progress_after_each_batch(manager: ModelManager) -> None:
    handle = manager.get("tiny-llama")
    calls: list[tuple[int, int]] = []
    result = verbalize(handle, TEXT, layer=0, batch_size=10, progress=lambda *c: calls.append(c))
    n = len(result.tokens)
    assert n == 24
    assert calls == [(10, n), (20, n), (24, n)]
    assert result.complete


def test_should_stop_after_the_first_batch_gives_a_partial_result(manager: ModelManager) -> None:
    handle = manager.get("tiny-gpt2")
    calls: list[tuple[int, int]] = []
    result = verbalize(
        handle,
        TEXT,
        layer=0,
        batch_size=4,
        progress=lambda *c: calls.append(c),
        should_stop=lambda: bool(calls),
    )
    assert not result.complete
    assert [row.position for row in result.rows] == [0, 1, 2, 3]
    assert calls == [(4, len(result.tokens))]
    full = verbalize(handle, TEXT, layer=0, positions=[0, 1, 2, 3])
    assert [r.explanation for r in result.rows] == [r.explanation for r in full.rows]


def test_should_stop_before_any_batch_gives_no_rows(manager: ModelManager) -> None:
    result = verbalize(manager.get("tiny-gpt2"), TEXT, layer=0, should_stop=lambda: True)
    assert result.rows == [] and not result.complete and result.tokens


def test_should_stop_after_the_last_batch_is_complete(manager: ModelManager) -> None:
    calls: list[tuple[int, int]] = []
    result = verbalize(
        manager.get("tiny-gpt2"),
        TEXT,
        layer=0,
        positions=[0, 1],
        progress=lambda *c: calls.append(c),
        should_stop=lambda: bool(calls),
    )
    assert result.complete and len(result.rows) == 2


def test_the_model_lock_is_held_while_it_runs(manager: ModelManager) -> None:
    handle = manager.get("tiny-gpt2")
    taken_elsewhere: list[bool] = []

    def try_lock() -> None:
        got = handle.lock.acquire(blocking=False)
        taken_elsewhere.append(got)
        if got:
            handle.lock.release()

    def progress(_done: int, _total: int) -> None:
        thread = threading.Thread(target=try_lock)
        thread.start()
        thread.join()

    verbalize(handle, TEXT, layer=0, positions=[0], progress=progress)
    assert taken_elsewhere == [False]
    try_lock()
    assert taken_elsewhere == [False, True]


@pytest.mark.parametrize("name", CAUSAL)
def test_no_hooks_are_left_on_the_model(manager: ModelManager, name: str) -> None:
    handle = manager.get(name)
    verbalize(handle, TEXT, layer=0, positions=[0])  # transformers may add its own first
    before = hook_count(handle.model)
    verbalize(handle, TEXT, layer=1, target_layer=0, batch_size=3)
    assert hook_count(handle.model) == before

    def fail(_done: int, _total: int) -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        verbalize(handle, TEXT, layer=0, progress=fail)
    assert hook_count(handle.model) == before


def test_a_model_name_is_loaded() -> None:
    result = verbalize("tiny-gpt2", "Hi", layer=0)
    assert result.model_name == "tiny-gpt2" and len(result.rows) == 2


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layer": 2}, r"layer must be an integer from -2 to 1 \(tiny-gpt2 has 2 layers"),
        ({"layer": -3}, "layer must be an integer from -2 to 1"),
        ({"layer": True}, "layer must be an integer"),
        ({"layer": 0, "target_layer": 5}, "target_layer must be an integer from -2 to 1"),
        ({"layer": 0, "positions": [23]}, "positions must be integers from -23 to 22"),
        ({"layer": 0, "positions": []}, "positions is empty"),
        ({"layer": 0, "max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"layer": 0, "batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"layer": 0, "max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"layer": 0, "identity_prompt": " "}, "identity_prompt is empty"),
        ({"layer": 0, "max_new_tokens": 2000}, "plus max_new_tokens"),
    ],
)
def test_bad_options_are_clear_errors(
    manager: ModelManager, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        verbalize(manager.get("tiny-gpt2"), TEXT, **options)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-t5"])
def test_encoders_are_refused(manager: ModelManager, name: str) -> None:
    with pytest.raises(NotADecoderError, match="needs a decoder-only language model"):
        verbalize(manager.get(name), TEXT, layer=0)


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text_is_refused(manager: ModelManager, text: str) -> None:
    with pytest.raises(EmptyInputError):
        verbalize(manager.get("tiny-gpt2"), text, layer=0)


def test_too_long_text_is_refused(manager: ModelManager) -> None:
    with pytest.raises(InputTooLongError, match="23 tokens; the limit is 8 \\(max_tokens\\)"):
        verbalize(manager.get("tiny-gpt2"), TEXT, layer=0, max_tokens=8)
    with pytest.raises(InputTooLongError, match="the model's context length"):
        verbalize(manager.get("tiny-gpt2"), "x" * 1100, layer=0, max_tokens=4096)


# -- the explanation and the result ---------------------------------------------------------


@pytest.mark.parametrize(
    ("continuation", "expected"),
    [
        (" -> Paris;\n\nThe output", "Paris"),
        (" Tower of Hanoi\n\nThe", "Tower of Hanoi"),
        (";\n\nThe output", ""),
        ("\n\nThe output", ""),
        (" a -> b; c", "a -> b"),
        ("  ->  x y ", "x y"),
    ],
)
def test_explanation_of_a_continuation(continuation: str, expected: str) -> None:
    assert explanation_of(continuation) == expected


def test_result_is_json_safe_and_round_trips(manager: ModelManager) -> None:
    result = verbalize(manager.get("tiny-llama"), TEXT, layer=0, positions=[0, 4])
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["version"] == 1 and data["complete"] is True
    assert data["rows"][0]["lens_top"][0][0] == result.rows[0].lens_top[0][0]
    assert VerbalizeResult.from_dict(data) == result


def test_html_table_escapes_everything() -> None:
    row = VerbalizeRow(0, "<b>", "<script>x</script>", 0.5, 1.0, [("&", 0.25)])
    result = VerbalizeResult("m<", "<b>", ["<b>"], 0, 0, "a -> a; ?", 8, [row], complete=False)
    page = result._repr_html_()
    assert "<script>" not in page and "<b>" not in page.replace("<b>m&lt;</b>", "")
    assert "&lt;script&gt;" in page and "&#x27;&amp;&#x27; 0.25" in page
    assert "partial result" in page
