"""Patchscope verbalisation on SmolLM2-135M: identity decoding of early-layer states.

What SmolLM2-135M-Instruct does with the default identity prompt (greedy, 8 new tokens),
seen here: the state of " Paris" in "The Eiffel Tower is in Paris" decodes to "Paris" at
every layer from 0 to 12 (at 15 and later it no longer does); at layers 2 and 3 every
content word tried came back as itself (" dog", " likes", " eat", " apples", " bought",
" car", " London"), while function words and the first token give continuations of the
prompt ("a classic example of ...", "this case, it is ...") or nothing. The KL between
the model's own next-token distribution and the patched first step falls with depth
(about 3 nats at layer 3, under 0.2 at layer 25) and is 0 after the last block, where
the patched state is the model's output itself.
"""

from __future__ import annotations

import time

import pytest

from tzoo.analyses.verbalize import VerbalizeResult, verbalize
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelManager

pytestmark = pytest.mark.slow

EIFFEL = "The Eiffel Tower is in Paris"
IDENTITY_LAYERS = (2, 3, 4)  # early-middle layers where identity decoding works here


@pytest.fixture(scope="module")
def smollm2(real_manager: ModelManager) -> ModelHandle:
    return real_manager.get("smollm2-135m")


def show(result: VerbalizeResult, seconds: float) -> None:
    print(f"\nlayer {result.source_layer} ({seconds:.2f} s): {result.text!r}")
    for row in result.rows:
        lens = ", ".join(f"{t!r}" for t, _ in row.lens_top[:3])
        print(
            f"  {row.position:2d} {row.token!r:12} -> {row.explanation!r:40} "
            f"kl {row.kl:5.2f}  H {row.entropy:4.2f}  lens {lens}"
        )


_RESULTS: dict[tuple[str, int, int], VerbalizeResult] = {}


def timed(handle: ModelHandle, text: str, layer: int, max_new_tokens: int = 8) -> VerbalizeResult:
    """verbalize, printed with its time; each (text, layer) runs once per session."""
    key = (text, layer, max_new_tokens)
    if key not in _RESULTS:
        start = time.perf_counter()
        _RESULTS[key] = verbalize(handle, text, layer=layer, max_new_tokens=max_new_tokens)
        show(_RESULTS[key], time.perf_counter() - start)
    return _RESULTS[key]


@pytest.mark.parametrize("layer", IDENTITY_LAYERS)
def test_a_place_name_decodes_to_itself_at_early_layers(smollm2: ModelHandle, layer: int) -> None:
    result = timed(smollm2, EIFFEL, layer=layer)
    assert result.complete and result.tokens[-1] == " Paris"
    assert "paris" in result.rows[-1].explanation.lower()


@pytest.mark.parametrize(
    ("text", "layer", "words"),
    [
        ("She bought a new car in London", 3, (" bought", " car", " London")),
        ("My dog likes to eat apples", 2, (" dog", " likes", " eat", " apples")),
    ],
)
def test_content_words_decode_to_themselves(
    smollm2: ModelHandle, text: str, layer: int, words: tuple[str, ...]
) -> None:
    result = timed(smollm2, text, layer=layer)
    explained = {row.token: row.explanation.lower() for row in result.rows}
    for token in words:
        assert token.strip().lower() in explained[token], (token, explained[token])


def test_kl_to_the_models_prediction_falls_with_depth(smollm2: ModelHandle) -> None:
    early = timed(smollm2, EIFFEL, layer=3)
    late = timed(smollm2, EIFFEL, layer=25)
    last = timed(smollm2, EIFFEL, layer=-1, max_new_tokens=1)
    mean = [sum(r.kl for r in result.rows) / len(result.rows) for result in (early, late)]
    assert mean[0] > 1.0 and mean[1] < 0.5, mean
    assert all(abs(row.kl) < 1e-4 for row in last.rows)
    assert last.source_layer == smollm2.n_layers - 1
