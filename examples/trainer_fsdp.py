"""Train a SWIFT Adapter on a tiny Llama with the Hugging Face Trainer and ``fsdp=...``, save the full adapter.

Run (2 processes; nothing is downloaded):

    torchrun --nproc_per_node 2 examples/trainer_fsdp.py --output_dir out
    # or: accelerate launch --num_processes 2 examples/trainer_fsdp.py --output_dir out

On GPUs the Trainer shards the model with FSDP2, one unit per ``LlamaDecoderLayer``. On CPU processes
transformers/accelerate do not run FSDP: the same arguments train under DDP (the script prints which engine
ran). Either way ``save_pretrained_full`` writes the full adapter from rank 0 in PEFT's layout.
"""

from __future__ import annotations

import argparse
import os

import torch
from accelerate_fsdp import GLOBAL_BATCH, LR, STEPS, build_model, dataset
from transformers import Trainer, TrainingArguments

from peft_swift_ext.distributed import is_sharded, save_pretrained_full


class TokenDataset(torch.utils.data.Dataset):
    """The example's token sequences as causal-LM samples (labels are the inputs)."""

    def __init__(self) -> None:
        self.ids = dataset().tensors[0]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default="trainer_fsdp_out")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        use_cpu=not torch.cuda.is_available(),
        fsdp=True,
        fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        seed=0,
    )
    trainer = Trainer(model=build_model(), args=training_args, train_dataset=TokenDataset())
    trainer.train()
    sharded = any(is_sharded(p) for p in trainer.model.parameters())
    engine = "FSDP2" if sharded else str(trainer.accelerator.distributed_type)
    if trainer.is_world_process_zero():
        print(f"trained with {engine} on {trainer.args.world_size} processes")
    save_pretrained_full(trainer.model, f"{args.output_dir}/adapter")
    if trainer.is_world_process_zero():
        print(f"saved the full adapter to {args.output_dir}/adapter")


if __name__ == "__main__":
    main()
