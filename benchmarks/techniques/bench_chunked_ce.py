"""Peak memory of one loss step (forward + backward): chunked linear+CE vs full logits + F.cross_entropy.

Run: python benchmarks/techniques/bench_chunked_ce.py
"""

import torch
import torch.nn.functional as F
from _measure import median_seconds, peak_allocated_bytes, write_result

from peft_swift_ext.techniques.chunked_ce import chunked_linear_cross_entropy

VOCAB, TOKENS, HIDDEN, CHUNK = 49152, 1024, 576, 128  # SmolLM2-135M's vocabulary and width


def main():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) * 0.02).requires_grad_()
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=generator)

    def full_step():
        loss = F.cross_entropy(hidden @ weight.t(), labels)
        return loss.detach(), torch.autograd.grad(loss, (hidden, weight))

    def chunked_step():
        loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=CHUNK)
        return loss.detach(), torch.autograd.grad(loss, (hidden, weight))

    full_peak, (full_loss, full_grads) = peak_allocated_bytes(full_step)
    chunked_peak, (chunked_loss, chunked_grads) = peak_allocated_bytes(chunked_step)
    max_grad_diff = max((a - b).abs().max().item() for a, b in zip(full_grads, chunked_grads))
    del full_grads, chunked_grads
    full_time, chunked_time = median_seconds(full_step, 3), median_seconds(chunked_step, 3)
    write_result(
        "chunked_ce",
        {
            "vocab": VOCAB,
            "tokens": TOKENS,
            "hidden": HIDDEN,
            "chunk_size": CHUNK,
            "full_logits_peak_mib": full_peak / 2**20,
            "chunked_peak_mib": chunked_peak / 2**20,
            "peak_ratio": chunked_peak / full_peak,
            "target_peak_ratio": 0.3,
            "loss_abs_diff": (full_loss - chunked_loss).abs().item(),
            "max_grad_abs_diff": max_grad_diff,
            "target_grad_atol": 1e-5,
            "step_time_ratio": chunked_time / full_time,
        },
    )


if __name__ == "__main__":
    main()
