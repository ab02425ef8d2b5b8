"""Q-GaLore with INT8-stored weights vs float-stored (simulated INT8) weights: weight bytes and training peak.

Four 1024 x 1024 linear layers (with ReLU between) trained for 4 steps by `QGaLoreAdamW` (rank 64, INT4
projections, bfloat16 moments). "simulated": float32 weights kept on the INT8 grid (`weight_bits=8`); "int8":
the layers converted by `quantize_linear_weights` (INT8 codes + float32 scale and zero per 256 values).
Weight and optimizer-state bytes are exact counts; the peak is the allocator's peak above the model and
optimizer state (replayed from the profiler's memory events), so it holds gradients, activations and transients
such as the dequantised weight.

Run: python benchmarks/techniques/bench_qgalore_int8.py
"""

import torch
from _measure import peak_allocated_bytes, write_result
from torch import nn

from peft_swift_ext.techniques.qgalore import QGaLoreAdamW, dequantize, quantize, quantize_linear_weights

WIDTH, LAYERS, TOKENS, STEPS, RANK = 1024, 4, 256, 4, 64


def make_model(int8: bool):
    torch.manual_seed(0)
    blocks = []
    for _ in range(LAYERS):
        blocks += [nn.Linear(WIDTH, WIDTH, bias=False), nn.ReLU()]
    model = nn.Sequential(*blocks[:-1])
    if int8:
        weights = quantize_linear_weights(model)
    else:
        weights = [m.weight for m in model if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for weight in weights:
                weight.copy_(dequantize(quantize(weight, 8, 256)))
    return model, weights


def tensor_bytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def train(int8: bool):
    model, weights = make_model(int8)
    group = {"params": weights, "rank": RANK, "update_proj_gap": 1000}
    optimizer = QGaLoreAdamW([group], lr=1e-3, weight_bits=8)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(TOKENS, WIDTH, generator=generator)
    targets = torch.randn(TOKENS, WIDTH, generator=generator)

    def step():
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    step()  # the SVD step: builds the projectors and moments, so the state exists before measuring
    state = optimizer.state_nbytes()
    peak, losses = peak_allocated_bytes(lambda: [step() for _ in range(STEPS)])
    return {"weights_mib": tensor_bytes(model) / 2**20, "state_mib": state / 2**20, "peak_mib": peak / 2**20,
            "loss_first_last": [losses[0], losses[-1]]}  # fmt: skip


def main():
    simulated, int8 = train(False), train(True)
    write_result(
        "qgalore_int8",
        {
            "layers": f"{LAYERS} x Linear({WIDTH}, {WIDTH}), {TOKENS} tokens a step, rank {RANK}",
            "simulated_float_storage": simulated,
            "int8_storage": int8,
            "weight_ratio": int8["weights_mib"] / simulated["weights_mib"],
            "persistent_ratio": (int8["weights_mib"] + int8["state_mib"])
            / (simulated["weights_mib"] + simulated["state_mib"]),
            "peak_total_ratio": (int8["weights_mib"] + int8["state_mib"] + int8["peak_mib"])
            / (simulated["weights_mib"] + simulated["state_mib"] + simulated["peak_mib"]),
        },
    )


if __name__ == "__main__":
    main()
