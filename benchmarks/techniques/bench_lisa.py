"""Peak training memory: full fine-tuning with AdamW vs LISA (2 of 8 decoder layers active), fp32, CPU.

The model is LLM-shaped: parameters dominate (hidden 768, 128 tokens a step) and the embeddings plus head are
about 4% of the parameters, as in a 7B Llama (2 x 32000 x 4096 of 6.7B). LISA runs as the registered PEFT method
(`get_peft_model(model, LisaConfig(...))`), with the optimizer built over every candidate and `LisaScheduler`
drawing layers. Four runs, each `STEPS` optimizer steps on the same learnable toy language:

- full: AdamW over every parameter;
- lisa: LISA's defaults (embeddings and head train);
- lisa_checkpointed: the same with `checkpoint_frozen_layers=True`;
- lisa_layers_only: embeddings and head frozen, frozen layers checkpointed;
- lisa_layerwise: LISA's defaults with frozen layers checkpointed and `create_layerwise_optimizer` (one AdamW
  per parameter, stepped in the backward pass, so the active layers' gradients never coexist).

Peak = the allocator's peak above the weights (replayed from the profiler's memory events), plus the weights.
The floor of each ratio (no activations, no transients) is (weights + 3 x trained parameters) / (4 x weights),
with 2 instead of 3 when the optimizer steps in the backward pass.

Run: python benchmarks/techniques/bench_lisa.py
"""

import torch
from _measure import peak_allocated_bytes, write_result
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_swift_ext import LisaConfig
from peft_swift_ext.techniques import LisaScheduler, create_layerwise_optimizer

STEPS, INTERVAL, ACTIVE = 20, 5, 2
BATCH, SEQ_LEN, VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS = 2, 64, 1536, 768, 2048, 8, 12
VARIANTS = {
    "lisa": {},
    "lisa_checkpointed": {"checkpoint_frozen_layers": True},
    "lisa_layers_only": {"checkpoint_frozen_layers": True, "train_embeddings": False, "train_head": False},
    "lisa_layerwise": {"checkpoint_frozen_layers": True},
}
LAYERWISE = {"lisa_layerwise"}


def make_model():
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, use_cache=False,
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


def train(options: dict | None, layerwise: bool = False):
    """One run; `options` None is full fine-tuning, else the LisaConfig options; `layerwise` steps in backward."""
    model = make_model()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    scheduler = None
    if options is not None:
        model = get_peft_model(model, LisaConfig(n_layers=ACTIVE, interval=INTERVAL, **options))
    if layerwise:  # AdamW's own default weight decay, so that only the stepping differs
        optimizer, _ = create_layerwise_optimizer(model, torch.optim.AdamW, lr=1e-3, weight_decay=0.01)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if options is not None:
        scheduler = LisaScheduler(model, optimizer=optimizer)

    def run():
        losses, trained = [], 0
        for batch in demo_batches():
            if scheduler is not None:
                scheduler.step()
            trained = max(trained, sum(p.numel() for p in model.parameters() if p.requires_grad))
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses, trained

    peak, (losses, trained) = peak_allocated_bytes(run)
    parameters = sum(p.numel() for p in model.parameters())
    return {"weights": weights, "peak": peak, "losses": losses, "trained": trained, "parameters": parameters}


def main():
    def mean(values):
        return sum(values) / len(values)

    full = train(None)
    weights, parameters = full["weights"], full["parameters"]
    embeddings_and_head = 2 * VOCAB * HIDDEN
    result = {
        "model": f"Llama, {LAYERS} layers, hidden {HIDDEN}, intermediate {INTERMEDIATE}, vocab {VOCAB}, fp32",
        "tokens_per_step": BATCH * SEQ_LEN, "parameters": parameters,
        "embeddings_and_head_share": embeddings_and_head / parameters,
        "steps": STEPS, "active_layers": ACTIVE, "interval": INTERVAL, "optimizer": "torch.optim.AdamW",
        "weights_mib": weights / 2**20, "full_peak_above_weights_mib": full["peak"] / 2**20,
        "full_loss_first5_last5": [mean(full["losses"][:5]), mean(full["losses"][-5:])],
        "target_peak_ratio": 0.45,
    }  # fmt: skip
    for name, options in VARIANTS.items():
        run = train(options, layerwise=name in LAYERWISE)
        result[name] = {
            "options": options,
            "optimizer": "create_layerwise_optimizer(AdamW)" if name in LAYERWISE else "torch.optim.AdamW",
            "peak_above_weights_mib": run["peak"] / 2**20,
            "peak_ratio_including_weights": (weights + run["peak"]) / (weights + full["peak"]),
            "peak_ratio_above_weights": run["peak"] / full["peak"],
            # gradients + two moments per trained parameter; no persistent gradients when stepping in backward
            "floor_ratio_including_weights": (parameters + (2 if name in LAYERWISE else 3) * run["trained"])
            / (4 * parameters),
            "most_trainable_parameters": run["trained"],
            "loss_first5_last5": [mean(run["losses"][:5]), mean(run["losses"][-5:])],
        }
    write_result("lisa", result)


if __name__ == "__main__":
    main()
