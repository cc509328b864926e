"""Facts about a model read from its config: kind of stack, sizes, which Auto class loads it."""

from __future__ import annotations

from typing import Any, Literal

from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig

Architecture = Literal["decoder", "encoder", "encoder-decoder"]

# Model types that are encoders even though transformers also offers a causal-LM head for
# some of them (BertLMHeadModel, RobertaForCausalLM...).
ENCODER_MODEL_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "distilbert",
        "albert",
        "electra",
        "deberta",
        "deberta-v2",
        "xlm-roberta",
        "mpnet",
        "camembert",
        "modernbert",
    }
)


def architecture_of(config: PretrainedConfig) -> Architecture:
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    names = config.architectures or []
    if any("CausalLM" in n or "LMHeadModel" in n for n in names):
        return "decoder"
    if config.model_type in ENCODER_MODEL_TYPES and not getattr(config, "is_decoder", False):
        return "encoder"
    return "decoder"


def auto_class_for(config: PretrainedConfig) -> Any:
    """The Auto class that keeps the model's own head: LM head for decoders and seq2seq,
    the bare encoder (or its masked-LM head when the checkpoint has one) for encoders."""
    kind = architecture_of(config)
    if kind == "encoder-decoder":
        return AutoModelForSeq2SeqLM
    if kind == "decoder":
        return AutoModelForCausalLM
    if any("MaskedLM" in n for n in config.architectures or []):
        from transformers import AutoModelForMaskedLM

        return AutoModelForMaskedLM
    return AutoModel


def _first_attr(config: PretrainedConfig, names: tuple[str, ...], default: int = 0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return default


def n_layers_of(config: PretrainedConfig) -> int:
    return _first_attr(config, ("num_hidden_layers", "n_layer", "num_layers"))


def n_heads_of(config: PretrainedConfig) -> int:
    return _first_attr(config, ("num_attention_heads", "n_head", "num_heads"))


def n_kv_heads_of(config: PretrainedConfig) -> int:
    return _first_attr(config, ("num_key_value_heads",), n_heads_of(config))


def d_model_of(config: PretrainedConfig) -> int:
    return _first_attr(config, ("hidden_size", "n_embd", "d_model"))
