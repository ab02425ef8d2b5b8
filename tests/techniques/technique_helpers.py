"""Tiny seeded models and data shared by the technique tests."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(num_hidden_layers: int = 4, seed: int = 0, **overrides) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def random_batch(batch_size: int = 2, seq_len: int = 12, vocab_size: int = 128, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary ("t0" ... "t127"), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(128)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="t0", pad_token="t1", eos_token="t2", bos_token="t3"
    )


def save_tiny_llama_with_tokenizer(path) -> LlamaForCausalLM:
    """A tiny Llama and its tokenizer saved to `path`, for loaders that need a model directory."""
    model = tiny_llama()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model
