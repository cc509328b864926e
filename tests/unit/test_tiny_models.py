"""The tiny random-weight models: deterministic, offline, of the right architecture."""

from __future__ import annotations

import pytest
import torch

from tzoo.runtime import tiny
from tzoo.runtime.architecture import architecture_of

FAMILIES = ["gpt2", "llama", "bert", "t5"]


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_weights_other_seed_other_weights(family: str) -> None:
    a = tiny.build_model(family).state_dict()
    b = tiny.build_model(family).state_dict()
    c = tiny.build_model(family, seed=7).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("family", FAMILIES)
def test_building_does_not_disturb_the_global_rng(family: str) -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    tiny.build_model(family)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trips_any_text(family: str) -> None:
    tokenizer = tiny.build_tokenizer(family)
    text = "Héllo, wörld! 1135 -> ∑"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert max(ids) < tiny.build_config(family).vocab_size


def test_special_token_templates_match_each_family() -> None:
    def tokens(family: str) -> list[str]:
        tok = tiny.build_tokenizer(family)
        return tok.convert_ids_to_tokens(tok("ab")["input_ids"])

    assert tokens("gpt2") == ["a", "b"]
    assert tokens("llama") == ["<s>", "a", "b"]
    assert tokens("bert") == ["[CLS]", "a", "b", "[SEP]"]
    assert tokens("t5") == ["a", "b", "</s>"]


@pytest.mark.parametrize(
    ("family", "kind"),
    [("gpt2", "decoder"), ("llama", "decoder"), ("bert", "encoder"), ("t5", "encoder-decoder")],
)
def test_architecture_is_detected_from_the_config(family: str, kind: str) -> None:
    assert architecture_of(tiny.build_config(family)) == kind


def test_tiny_llama_uses_grouped_query_attention() -> None:
    config = tiny.build_config("llama")
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
