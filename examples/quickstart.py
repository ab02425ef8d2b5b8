"""Two tuners of different types on one tiny Llama: train, save, reload, check.

Run: python examples/quickstart.py   (CPU, a few seconds; nothing is downloaded)
"""

from __future__ import annotations

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peft_swift_ext import AdapterConfig, LoraPlusConfig, Swift


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def main() -> None:
    model = Swift.prepare_model(
        tiny_llama(),
        {
            "lora": LoraPlusConfig(r=8, target_modules=["q_proj", "v_proj"], lorap_lr_ratio=16.0),
            "adapter": AdapterConfig(dim=32, target_modules=r"model\.layers\.\d+\.mlp", adapter_length=16),
        },
    )
    print(model.get_trainable_parameters())

    # Learn to continue a fixed repeating sequence.
    batch = torch.arange(16).repeat(4, 2) % 64
    optimizer = torch.optim.AdamW(model.create_optimizer_param_groups(lr=1e-2, weight_decay=0.0))
    model.train()
    for step in range(30):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == 29:
            print(f"step {step:2d}  loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        trained = model(input_ids=batch).logits
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = Swift.from_pretrained(tiny_llama(), folder).eval()
        with torch.no_grad():
            difference = (reloaded(input_ids=batch).logits - trained).abs().max().item()
    print(f"adapters {reloaded.adapters} reloaded; max output difference {difference:.2e}")
    assert difference < 1e-5, "reloaded model disagrees with the trained one"


if __name__ == "__main__":
    main()
