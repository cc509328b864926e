"""Tiny random-weight models for fast tests and for architectures with no shipped weights.

Each is built from a config with a fixed seed, so the same name always gives the same
weights. They share a byte-level tokenizer built in code (256 byte symbols plus the special
tokens each family expects): nothing is downloaded and no other model package is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
)

TINY_SEED = 1234
_MAX_POSITIONS = 1024


@dataclass(frozen=True)
class TinyRecipe:
    """How to build one tiny model: its specials, config and model class."""

    family: str  # gpt2 | llama | bert | t5: the tokenizer and config
    specials: tuple[str, ...]
    make_config: Callable[[dict[str, int]], PretrainedConfig]
    auto_class: Any


def build_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer whose special tokens and template match recipe ``name``."""
    recipe = TINY_RECIPES[name]
    family = recipe.family
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(recipe.specials)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    ids = {tok: vocab[tok] for tok in recipe.specials}
    kwargs: dict[str, str] = {}
    if family == "gpt2":
        kwargs = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
        kwargs["pad_token"] = "<|endoftext|>"
    elif family == "llama":
        kwargs = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        kwargs["pad_token"] = "</s>"
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", ids["<s>"])]
        )
    elif family == "bert":
        kwargs = {
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "mask_token": "[MASK]",
            "unk_token": "[UNK]",
        }
        core.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
        )
    elif family == "t5":
        kwargs = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
        core.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", ids["</s>"])]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **kwargs)
    tokenizer.model_max_length = _MAX_POSITIONS
    return tokenizer


def _gpt2(ids: dict[str, int]) -> PretrainedConfig:
    return GPT2Config(
        vocab_size=ids["vocab_size"],
        n_positions=_MAX_POSITIONS,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def _llama(ids: dict[str, int]) -> PretrainedConfig:
    # Grouped-query attention (4 query heads sharing 2 KV heads), like SmolLM2.
    return LlamaConfig(
        vocab_size=ids["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=_MAX_POSITIONS,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["</s>"],
        tie_word_embeddings=True,
    )


def _bert(ids: dict[str, int]) -> PretrainedConfig:
    return BertConfig(
        vocab_size=ids["vocab_size"],
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=_MAX_POSITIONS,
        pad_token_id=ids["[PAD]"],
    )


def _t5(ids: dict[str, int]) -> PretrainedConfig:
    return T5Config(  # type: ignore[call-arg]  # decoder_start_token_id goes through **kwargs
        vocab_size=ids["vocab_size"],
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=ids["<pad>"],
        eos_token_id=ids["</s>"],
        decoder_start_token_id=ids["<pad>"],
    )


_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TINY_RECIPES: dict[str, TinyRecipe] = {
    "gpt2": TinyRecipe("gpt2", ("<|endoftext|>",), _gpt2, AutoModelForCausalLM),
    "llama": TinyRecipe("llama", ("<unk>", "<s>", "</s>"), _llama, AutoModelForCausalLM),
    "bert": TinyRecipe("bert", _BERT_SPECIALS, _bert, AutoModel),
    # The same encoder with a masked-LM head: logits to attribute (circuits on encoders).
    "bert-mlm": TinyRecipe("bert", _BERT_SPECIALS, _bert, AutoModelForMaskedLM),
    "t5": TinyRecipe("t5", ("<pad>", "</s>", "<unk>"), _t5, AutoModelForSeq2SeqLM),
}


def build_config(family: str) -> PretrainedConfig:
    recipe = TINY_RECIPES[family]
    ids = {tok: i for i, tok in enumerate(recipe.specials)}
    ids["vocab_size"] = len(recipe.specials) + 256
    config = recipe.make_config(ids)
    config.architectures = [_architecture_name(recipe, config)]
    return config


def build_model(family: str, *, seed: int = TINY_SEED) -> PreTrainedModel:
    """The tiny model of ``family``, with weights drawn from ``seed`` (same seed, same
    weights), in eval mode, float32, on the CPU."""
    recipe = TINY_RECIPES[family]
    config = build_config(family)
    # Eager attention so attention weights can be read out.
    config._attn_implementation = "eager"
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = recipe.auto_class.from_config(config, attn_implementation="eager")
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def _architecture_name(recipe: TinyRecipe, config: PretrainedConfig) -> str:
    if recipe.auto_class is AutoModelForMaskedLM:
        return "BertForMaskedLM"
    names = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertModel"}
    return names.get(recipe.family, "T5ForConditionalGeneration")
