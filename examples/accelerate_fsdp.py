"""Train a SWIFT Adapter on a tiny Llama with FSDP2 through accelerate, save the full adapter from rank 0.

Run (2 CPU processes; nothing is downloaded):

    accelerate launch --config_file examples/accelerate_fsdp.yaml examples/accelerate_fsdp.py --output_dir out

On GPUs accelerate applies FSDP2 from the config file. accelerate does not run FSDP on CPU processes (it
falls back to DDP without a word), so there the script shards the model itself with
``fully_shard_peft_model``. The same script runs with DDP (``distributed_type: MULTI_CPU`` / ``MULTI_GPU``)
or in one process (``python examples/accelerate_fsdp.py``). ``save_pretrained_full`` gathers the sharded
adapter tensors (a collective, every rank calls it) and rank 0 writes PEFT's layout, which loads with
``PeftModel.from_pretrained`` in a single process.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator, DistributedType
from peft import get_peft_model
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from peft_swift_ext import AdapterConfig
from peft_swift_ext.distributed import fully_shard_peft_model, is_sharded, save_pretrained_full

GLOBAL_BATCH = 4
STEPS = 3
LR = 0.5


def build_model() -> torch.nn.Module:
    """A seeded two-layer Llama with a SWIFT Adapter after every MLP (same weights on every rank)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = get_peft_model(LlamaForCausalLM(config), AdapterConfig(dim=32, target_modules=["mlp"], adapter_length=8))
    with torch.no_grad():  # the adapter starts as the identity; nudge it so every weight gets a gradient
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


def dataset() -> TensorDataset:
    """``STEPS * GLOBAL_BATCH`` random token sequences; sample ``i`` is the same in every process."""
    ids = torch.randint(0, 128, (STEPS * GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(1))
    return TensorDataset(ids)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default="accelerate_fsdp_out")
    args = parser.parse_args()

    # without a GPU: CPU processes talking over gloo (FSDP2 with frozen base weights runs there)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    accelerator.print(f"{accelerator.num_processes} processes, {accelerator.distributed_type}")
    model = build_model()
    # each process gets GLOBAL_BATCH / num_processes rows of every global batch
    loader = DataLoader(dataset(), batch_size=GLOBAL_BATCH // accelerator.num_processes)
    if accelerator.distributed_type == DistributedType.FSDP:
        # on GPUs accelerate shards the model as the config file says
        model = accelerator.prepare(model)
    elif accelerator.num_processes > 1:
        # accelerate runs FSDP on accelerators only (CPU processes would silently get DDP): shard with FSDP2 here
        model = fully_shard_peft_model(model)
    sharded = sum(is_sharded(p) for p in model.parameters())
    accelerator.print(f"{sharded} of {len(list(model.parameters()))} parameters sharded")
    # the optimizer is created from the sharded parameters
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    optimizer, loader = accelerator.prepare(optimizer, loader)
    model.train()
    for (input_ids,) in loader:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.print(f"loss {loss.item():.4f}")
    save_pretrained_full(accelerator.unwrap_model(model), args.output_dir)
    accelerator.print(f"saved the full adapter to {args.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
