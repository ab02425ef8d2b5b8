"""The reference the server's answers are checked against: each request run alone, unbatched, with PEFT."""

from __future__ import annotations

import torch

from peft_swift_ext import Swift, SwiftModel
from peft_swift_ext.serve.engine import BASE_MODEL_NAME, Engine, Row


def alone(model, engine: Engine, row: Row) -> list[int]:
    """The reference: the request on its own, unpadded, its adapter the only active one (base: adapters disabled)."""
    ids = torch.tensor([row.prompt_ids])
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": row.max_new_tokens}
    kwargs |= {"do_sample": False, "pad_token_id": engine.pad_token_id}
    if isinstance(model, SwiftModel):
        model.set_active_adapters([] if row.adapter == BASE_MODEL_NAME else [row.adapter])
        output = model.generate(**kwargs)
    elif row.adapter == BASE_MODEL_NAME:
        with model.disable_adapter():
            output = model.generate(**kwargs)
    else:
        model.set_adapter(row.adapter)
        output = model.generate(**kwargs)
    tokens = output[0, ids.shape[1] :].tolist()
    stop = next((i for i, t in enumerate(tokens) if t in engine.eos_token_ids), len(tokens))
    return tokens[:stop]


def reference_model(serving_files):
    """The served adapters loaded the ordinary way: a SwiftModel for a SWIFT-layout folder, else a PeftModel."""
    from peft import PeftModel

    from peft_swift_ext.serve.loading import find_adapters, load_base_model

    model_dir, adapters_dir = serving_files
    base, _ = load_base_model(model_dir)
    if (adapters_dir / "configuration.json").is_file():
        return Swift.from_pretrained(base, adapters_dir).eval()
    adapters = find_adapters(adapters_dir)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()
