"""What a decoder adds to the generic checks: generate, inputs_embeds and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from .cases import DECODER_CASES
from .common import adapted, adapter_parameters, case_params, loss_of, outputs

pytestmark = pytest.mark.parametrize("case", case_params(DECODER_CASES))

NEW_TOKENS = 3


def with_mask(inputs: dict) -> dict:
    return {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}


def test_generate_takes_keyword_and_positional_inputs(case):
    model = adapted(case)
    inputs = with_mask(case.make_inputs())
    by_keyword = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert by_keyword.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + NEW_TOKENS)
    by_position = model.generate(
        inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=NEW_TOKENS, do_sample=False
    )
    assert torch.equal(by_keyword, by_position)


def test_generate_on_a_bf16_base(case):
    model = get_peft_model(case.make_model().to(torch.bfloat16), case.make_config()).eval()
    inputs = with_mask(case.make_inputs())
    generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS


def test_inputs_embeds_give_the_same_outputs_as_token_ids(case):
    model = adapted(case)
    inputs = case.make_inputs()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
    from_embeds = outputs(case, model, {"inputs_embeds": embeds})
    torch.testing.assert_close(from_embeds, outputs(case, model, inputs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(case, reentrant):
    if case.weightless:
        pytest.skip(f"{case.tuner} has no weights to train")
    gradients = []
    for checkpointing in (False, True):
        base = case.make_model()
        if checkpointing:  # as users do: checkpointing first, then PEFT (which makes the inputs require grad)
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model = get_peft_model(base, case.make_config()).train()
        torch.manual_seed(0)
        loss_of(case, model).backward()
        own = [p for p in adapter_parameters(model).values() if p.requires_grad]
        assert own and all(p.grad is not None for p in own), "no gradient reached the adapter"
        gradients.append([p.grad.clone() for p in own])
    for plain, checkpointed in zip(*gradients, strict=True):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)
