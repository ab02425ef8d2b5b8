"""Peak training memory: full fine-tuning with AdamW vs LISA (2 of 8 decoder layers active), one run.

Run: python benchmarks/techniques/bench_lisa.py
"""

import torch
from _measure import peak_allocated_bytes, write_result
from transformers import LlamaConfig, LlamaForCausalLM

from peft_swift_ext.techniques.lisa import LisaConfig, LisaScheduler

STEPS, BATCH, SEQ_LEN, VOCAB = 20, 2, 64, 256


def make_model():
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def demo_batches():
    """A learnable toy language: each token is followed by a fixed successor (a seeded permutation)."""
    generator = torch.Generator().manual_seed(0)
    successor = torch.randperm(VOCAB, generator=generator)
    for _ in range(STEPS):
        tokens = [torch.randint(0, VOCAB, (BATCH,), generator=generator)]
        for _ in range(SEQ_LEN - 1):
            tokens.append(successor[tokens[-1]])
        ids = torch.stack(tokens, dim=1)
        yield {"input_ids": ids, "labels": ids}


def train(use_lisa: bool):
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = LisaScheduler(model, LisaConfig(n_layers=2, interval=5), optimizer) if use_lisa else None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    parameters = sum(p.numel() for p in model.parameters())

    def run():
        losses = []
        for batch in demo_batches():
            if scheduler is not None:
                scheduler.step()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    peak, losses = peak_allocated_bytes(run)
    return weights, parameters, peak, losses


def main():
    weights, parameters, full_peak, full_losses = train(use_lisa=False)
    _, _, lisa_peak, lisa_losses = train(use_lisa=True)

    def mean(values):
        return sum(values) / len(values)

    write_result(
        "lisa",
        {
            "model": "Llama, 8 layers, hidden 384, fp32", "parameters": parameters, "steps": STEPS,
            "active_layers": 2, "interval": 5,
            "weights_mib": weights / 2**20,
            "full_peak_above_weights_mib": full_peak / 2**20,
            "lisa_peak_above_weights_mib": lisa_peak / 2**20,
            "peak_ratio_including_weights": (weights + lisa_peak) / (weights + full_peak),
            "peak_ratio_above_weights": lisa_peak / full_peak,
            "target_peak_ratio": 0.45,
            "full_loss_first5_last5": [mean(full_losses[:5]), mean(full_losses[-5:])],
            "lisa_loss_first5_last5": [mean(lisa_losses[:5]), mean(lisa_losses[-5:])],
        },
    )  # fmt: skip


if __name__ == "__main__":
    main()
