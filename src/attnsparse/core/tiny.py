"""Tiny random causal LMs built in code: for tests, examples and benchmarks that must not touch a hub."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)


def tiny_llama(
    seed: int = 0,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    vocab: int = 97,
    max_positions: int = 512,
    sliding_window: int | None = None,
) -> PreTrainedModel:
    """A random Llama (grouped-query attention when kv_heads < heads), float32, in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        attn_implementation="sdpa",
    )
    if sliding_window is not None:
        config.sliding_window = sliding_window
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, layers: int = 2, heads: int = 4, hidden: int = 32, vocab: int = 97,
              max_positions: int = 512) -> PreTrainedModel:
    """A random GPT-2 (no GQA, passes an explicit `scaling`), float32, in eval mode."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
        bos_token_id=0, eos_token_id=0, attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config).eval()


def tiny_tokenizer(vocab: int = 97) -> PreTrainedTokenizerFast:
    """A character-level tokenizer built offline: [UNK] plus the first vocab-1 printable ASCII characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    table = {"[UNK]": 0} | {ch: i + 1 for i, ch in enumerate(chars[: vocab - 1])}
    tokenizer = Tokenizer(models.WordLevel(table, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[UNK]")


def save_tiny(directory: str, model: PreTrainedModel | None = None) -> str:
    """Save a tiny model (default: tiny_llama) with the character tokenizer as a loadable HF directory."""
    model = model if model is not None else tiny_llama()
    model.save_pretrained(directory)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(directory)
    return directory
