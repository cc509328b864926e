"""Transcoders on disk in circuit-tracer's format: round trips of every kind, the exact file
names, tensor shapes and YAML keys circuit-tracer reads, directories laid out by hand the
way circuit-tracer writes them, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from tzoo_testing import make_settings

from tzoo.circuits.io import (
    CONFIG_FILE,
    TranscoderFormatError,
    TranscoderMismatchError,
    TranscodersNotFoundError,
    check_compatible,
    default_transcoders_dir,
    list_saved_transcoders,
    load_transcoders,
    save_transcoders,
)
from tzoo.circuits.transcoders import TranscoderConfig, TranscoderSet
from tzoo.runtime.handle import ModelHandle
from tzoo.runtime.manager import ModelManager

D, F = 16, 40
LAYERS = (1, 2, 3)
KINDS = [(k, a) for k in ("plt", "skip", "clt") for a in ("jumprelu", "topk")]


def random_set(
    kind: str = "plt", activation: str = "jumprelu", **overrides: object
) -> TranscoderSet:
    """A set with every weight random and scales far from 1, so folding is exercised."""
    values: dict[str, object] = {
        "model_name": "tiny-llama",
        "kind": kind,
        "d_model": D,
        "n_features": F,
        "layers": LAYERS,
        "n_model_layers": 5,
        "activation": activation,
        "top_k": 6,
    }
    values.update(overrides)
    transcoders = TranscoderSet(TranscoderConfig(**values), seed=1)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in transcoders.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
        for threshold in transcoders.threshold:
            threshold.abs_()
        layers = enumerate(transcoders.layers)
        norms_in, norms_out = (2.0, 3.0, 0.5), (4.0, 0.7, 1.5)
        transcoders.set_scales(
            {layer: norms_in[k % 3] for k, layer in layers},
            {layer: norms_out[k % 3] for k, layer in enumerate(transcoders.layers)},
        )
    return transcoders


def inputs(layers: tuple[int, ...] = LAYERS, seed: int = 3) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {layer: 3 * torch.randn(2, 7, D, generator=generator) for layer in layers}


def tensors_in(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> ModelHandle:
    return ModelManager(make_settings(tmp_path_factory.mktemp("io"))).get("tiny-llama")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> ModelHandle:
    return ModelManager(make_settings(tmp_path_factory.mktemp("io-gpt2"))).get("tiny-gpt2")


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "activation"), KINDS)
def test_a_saved_set_loads_back_with_the_same_predictions(
    tmp_path: Path, kind: str, activation: str
) -> None:
    original = random_set(kind, activation)
    loaded = load_transcoders(save_transcoders(original, tmp_path / "set"))
    assert loaded.config == original.config
    assert torch.equal(loaded.input_scale, torch.ones(3))  # folded into the weights
    assert torch.equal(loaded.output_scale, torch.ones(3))
    with torch.no_grad():
        expected_out, expected_acts = original(inputs())
        out, acts = loaded(inputs())
    for layer in LAYERS:
        assert (expected_acts[layer] > 0).any()
        torch.testing.assert_close(acts[layer], expected_acts[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[layer], expected_out[layer], atol=1e-5, rtol=1e-5)


def test_saving_again_replaces_the_files_of_an_earlier_set(tmp_path: Path) -> None:
    save_transcoders(random_set("plt", layers=(0, 1, 2, 3, 4)), tmp_path)
    save_transcoders(random_set("clt"), tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"W_{w}_{i}.safetensors" for w in ("dec", "enc") for i in LAYERS] + [
        CONFIG_FILE
    ]
    assert load_transcoders(tmp_path).config.kind == "clt"


# -- circuit-tracer's names, shapes and keys --------------------------------------------------


def test_a_per_layer_set_has_circuit_tracers_files(tmp_path: Path) -> None:
    save_transcoders(random_set("skip", "jumprelu"), tmp_path)
    config = yaml.safe_load((tmp_path / CONFIG_FILE).read_text())
    assert config["model_kind"] == "transcoder_set"
    assert config["feature_input_hook"] == "mlp.hook_in"
    assert config["feature_output_hook"] == "mlp.hook_out"
    assert config["model_name"] == "tiny-llama"
    assert config["tzoo"]["kind"] == "skip" and config["tzoo"]["layers"] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.glob("layer_*.safetensors")) == [
        f"layer_{i}.safetensors" for i in LAYERS
    ]
    tensors = tensors_in(tmp_path / "layer_2.safetensors")
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    assert shapes == {
        "W_enc": (F, D),  # (d_transcoder, d_model): circuit-tracer runs F.linear(x, W_enc)
        "W_dec": (F, D),
        "b_enc": (F,),
        "b_dec": (D,),
        "activation_function.threshold": (F,),
        "W_skip": (D, D),
    }
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_the_stored_weights_compute_what_circuit_tracer_computes(tmp_path: Path) -> None:
    """circuit-tracer's per-layer transcoder: pre = x @ W_enc.T + b_enc, JumpReLU on
    activation_function.threshold, y = a @ W_dec + b_dec + x @ W_skip.T (model units)."""
    original = random_set("skip", "jumprelu")
    save_transcoders(original, tmp_path)
    x = inputs()
    with torch.no_grad():
        expected, _ = original(x)
    for layer in LAYERS:
        t = tensors_in(tmp_path / f"layer_{layer}.safetensors")
        pre = x[layer] @ t["W_enc"].T + t["b_enc"]
        acts = pre * (pre > t["activation_function.threshold"])
        y = acts @ t["W_dec"] + t["b_dec"] + x[layer] @ t["W_skip"].T
        torch.testing.assert_close(y, expected[layer], atol=1e-5, rtol=1e-5)


def test_a_cross_layer_transcoder_has_circuit_tracers_files(tmp_path: Path) -> None:
    original = random_set("clt", "jumprelu", layers=(0, 1, 2), n_model_layers=3)
    save_transcoders(original, tmp_path)
    config = yaml.safe_load((tmp_path / CONFIG_FILE).read_text())
    assert config["model_kind"] == "cross_layer_transcoder"
    for i in range(3):
        encoder = tensors_in(tmp_path / f"W_enc_{i}.safetensors")
        assert {name: tuple(t.shape) for name, t in encoder.items()} == {
            f"W_enc_{i}": (F, D),
            f"b_enc_{i}": (F,),
            f"b_dec_{i}": (D,),
            f"threshold_{i}": (F,),
        }
        decoder = tensors_in(tmp_path / f"W_dec_{i}.safetensors")
        assert {name: tuple(t.shape) for name, t in decoder.items()} == {
            f"W_dec_{i}": (F, 3 - i, D)  # layer i's features write to layers i..2
        }
    # circuit-tracer's CLT: y_l = sum_{s <= l} a_s @ W_dec_s[:, l - s] + b_dec_l
    x = inputs((0, 1, 2))
    with torch.no_grad():
        expected, _ = original(x)
    acts = {}
    for s in range(3):
        t = tensors_in(tmp_path / f"W_enc_{s}.safetensors")
        pre = x[s] @ t[f"W_enc_{s}"].T + t[f"b_enc_{s}"]
        acts[s] = pre * (pre > t[f"threshold_{s}"])
    for layer in range(3):
        b_dec = tensors_in(tmp_path / f"W_enc_{layer}.safetensors")[f"b_dec_{layer}"]
        y = b_dec + sum(
            acts[s] @ tensors_in(tmp_path / f"W_dec_{s}.safetensors")[f"W_dec_{s}"][:, layer - s]
            for s in range(layer + 1)
        )
        torch.testing.assert_close(y, expected[layer], atol=1e-5, rtol=1e-5)


def test_topk_sets_say_so_and_carry_no_threshold(tmp_path: Path) -> None:
    save_transcoders(random_set("plt", "topk"), tmp_path)
    config = yaml.safe_load((tmp_path / CONFIG_FILE).read_text())
    assert config["activation"] == "topk" and config["k"] == 6
    assert set(tensors_in(tmp_path / "layer_1.safetensors")) == {"W_enc", "W_dec", "b_enc", "b_dec"}


def test_a_bundled_model_is_named_by_its_hub_id() -> None:
    from tzoo.circuits.io import _yaml_config

    config = random_set(model_name="smollm2-135m").config
    written = _yaml_config(config)
    assert written["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert written["tzoo"]["model"] == "smollm2-135m"


# -- reading circuit-tracer's own layout ------------------------------------------------------


def _their_plt(directory: Path, *, skip: bool, threshold: bool, legacy: bool = False) -> dict:
    """Write a per-layer set the way circuit-tracer does; return its tensors by layer."""
    generator = torch.Generator().manual_seed(5)
    written = {}
    for layer in range(2):
        t = {
            "W_enc": torch.randn(F, D, generator=generator) / 4,
            "W_dec": torch.randn(F, D, generator=generator) / 4,
            "b_enc": torch.randn(F, generator=generator) / 4,
            "b_dec": torch.randn(D, generator=generator),
        }
        if threshold:
            t["activation_function.threshold"] = torch.rand(F, generator=generator) / 4
        if skip:
            t["W_skip"] = torch.randn(D, D, generator=generator) / 4
        on_disk = dict(t, W_dec=t["W_dec"].T.contiguous()) if legacy else t
        save_file(on_disk, str(directory / f"layer_{layer}.safetensors"))
        written[layer] = t
    return written


def _their_forward(t: dict, x: torch.Tensor) -> torch.Tensor:
    pre = x @ t["W_enc"].T + t["b_enc"]
    cut = t.get("activation_function.threshold", torch.zeros(()))
    y = (pre * (pre > cut)) @ t["W_dec"] + t["b_dec"]
    return y + x @ t["W_skip"].T if "W_skip" in t else y


@pytest.mark.parametrize(("skip", "threshold"), [(False, False), (True, True)])
def test_reads_a_per_layer_set_written_by_circuit_tracer(
    tmp_path: Path, skip: bool, threshold: bool
) -> None:
    written = _their_plt(tmp_path, skip=skip, threshold=threshold)
    config = {
        "model_kind": "transcoder_set",
        "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "scan": "someone/transcoders",
    }
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(config))
    loaded = load_transcoders(tmp_path)
    assert loaded.config.kind == ("skip" if skip else "plt")
    assert loaded.config.activation == "jumprelu"  # a ReLU set is JumpReLU at threshold 0
    assert loaded.config.layers == (0, 1) and loaded.config.n_model_layers == 2
    assert loaded.config.model_name == config["model_name"]
    x = inputs((0, 1))
    with torch.no_grad():
        out, _ = loaded(x)
    for layer in (0, 1):
        expected = _their_forward(written[layer], x[layer])
        torch.testing.assert_close(out[layer], expected, atol=1e-5, rtol=1e-5)


def test_reads_the_older_circuit_tracer_layout(tmp_path: Path) -> None:
    """The 2025 configs listed {id, layer, filepath}, and W_dec was (d_model, d_transcoder)."""
    written = _their_plt(tmp_path, skip=True, threshold=False, legacy=True)
    config = {
        "model_name": "meta-llama/Llama-3.2-1B",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out",
        "transcoders": [
            {"id": f"relu-{i}", "layer": i, "filepath": f"layer_{i}.safetensors"} for i in (0, 1)
        ],
    }
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(config))
    loaded = load_transcoders(tmp_path)
    x = inputs((0, 1))
    with torch.no_grad():
        out, _ = loaded(x)
    for layer in (0, 1):
        torch.testing.assert_close(
            out[layer], _their_forward(written[layer], x[layer]), atol=1e-5, rtol=1e-5
        )


def test_reads_a_cross_layer_transcoder_written_by_circuit_tracer(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(6)
    n = 3
    enc, dec = {}, {}
    for i in range(n):
        enc[i] = {
            f"W_enc_{i}": torch.randn(F, D, generator=generator) / 4,
            f"b_enc_{i}": torch.randn(F, generator=generator) / 4,
            f"b_dec_{i}": torch.randn(D, generator=generator),
            f"threshold_{i}": torch.rand(F, generator=generator) / 4,
        }
        dec[i] = torch.randn(F, n - i, D, generator=generator) / 4
        save_file(enc[i], str(tmp_path / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": dec[i]}, str(tmp_path / f"W_dec_{i}.safetensors"))
    config = {
        "model_kind": "cross_layer_transcoder",
        "model_name": "google/gemma-2-2b",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
    }
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(config))
    loaded = load_transcoders(tmp_path)
    assert loaded.config.kind == "clt" and loaded.config.layers == (0, 1, 2)
    x = inputs((0, 1, 2))
    with torch.no_grad():
        out, _ = loaded(x)
    acts = {}
    for s in range(n):
        pre = x[s] @ enc[s][f"W_enc_{s}"].T + enc[s][f"b_enc_{s}"]
        acts[s] = pre * (pre > enc[s][f"threshold_{s}"])
    for layer in range(n):
        expected = enc[layer][f"b_dec_{layer}"] + sum(
            acts[s] @ dec[s][:, layer - s] for s in range(layer + 1)
        )
        torch.testing.assert_close(out[layer], expected, atol=1e-5, rtol=1e-5)


# -- errors -----------------------------------------------------------------------------------


def test_a_directory_without_config_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(TranscodersNotFoundError, match=r"no config\.yaml"):
        load_transcoders(tmp_path)


def test_missing_files_and_wrong_shapes_are_named(tmp_path: Path) -> None:
    save_transcoders(random_set("plt"), tmp_path)
    (tmp_path / "layer_2.safetensors").unlink()
    with pytest.raises(TranscoderFormatError, match=r"layer_2\.safetensors"):
        load_transcoders(tmp_path)
    save_transcoders(random_set("plt"), tmp_path)
    t = tensors_in(tmp_path / "layer_2.safetensors")
    save_file(dict(t, W_enc=t["W_enc"][:, :-1].contiguous()), str(tmp_path / "layer_2.safetensors"))
    with pytest.raises(
        TranscoderFormatError, match=r"W_enc has shape \(40, 15\); expected \(40, 16\)"
    ):
        load_transcoders(tmp_path)
    save_transcoders(random_set("clt"), tmp_path)
    (tmp_path / "W_dec_3.safetensors").unlink()
    with pytest.raises(TranscoderFormatError, match=r"lacks W_dec_3\.safetensors"):
        load_transcoders(tmp_path)


def test_unknown_hooks_and_model_kinds_are_refused(tmp_path: Path) -> None:
    _their_plt(tmp_path, skip=False, threshold=False)
    config = {"model_kind": "transcoder_set", "feature_input_hook": "hook_resid_mid"}
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(config))
    with pytest.raises(TranscoderFormatError, match="hook_resid_mid"):
        load_transcoders(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump({"model_kind": "sae"}))
    with pytest.raises(TranscoderFormatError, match="model_kind"):
        load_transcoders(tmp_path)


def test_transcoders_for_another_model_are_refused(
    tmp_path: Path, llama: ModelHandle, gpt2: ModelHandle
) -> None:
    ours = random_set("plt", layers=(0, 1), d_model=llama.d_model, n_model_layers=llama.n_layers)
    save_transcoders(ours, tmp_path)
    assert load_transcoders(tmp_path, handle=llama).config.model_name == "tiny-llama"
    # tiny-gpt2 has the same width and depth: the name tells them apart
    with pytest.raises(TranscoderMismatchError, match="trained on tiny-llama"):
        load_transcoders(tmp_path, handle=gpt2)
    with pytest.raises(TranscoderMismatchError, match="d_model is 16"):
        check_compatible(random_set("plt"), llama)


def test_list_shows_ours_and_theirs(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    ours = random_set("clt", "topk")
    save_transcoders(ours, default_transcoders_dir(ours.config, settings))
    theirs = tmp_path / "cache" / "transcoders" / "downloaded" / "relu"
    theirs.mkdir(parents=True)
    _their_plt(theirs, skip=True, threshold=False)
    (theirs / CONFIG_FILE).write_text(yaml.safe_dump({"model_kind": "transcoder_set"}))
    saved = list_saved_transcoders(tmp_path / "cache" / "transcoders")
    assert [s.path.name for s in saved] == ["relu", "clt-topk-40f-L1-3"]
    assert (saved[0].kind, saved[0].activation, saved[0].layers, saved[0].n_features) == (
        "skip",
        "relu",
        [0, 1],
        F,
    )
    assert (saved[1].kind, saved[1].activation, saved[1].layers) == ("clt", "topk", [1, 2, 3])
