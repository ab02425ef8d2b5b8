"""The stacking defects of the issue "Correct under composition" (defect 1), one test each, plus those the pairwise
matrix found.

On 58294af (before the injection fix) the tests of the issue's four defects fail (LoRA inside mlp, adapters
inside prompted layers, the ms-swift checkpoint, two Adapters added mlp first), as do the method adapter added
after prompts and the wrong-nesting check. On 4ccfdae (after it) five fail: the ms-swift pair loaded the other way
round, Res-Tuning's stems, the method adapter added after prompts, and both merge refusals.
"""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from peft_swift_ext import LlamaProConfig, Swift
from peft_swift_ext.tuners.adapter.layer import AdapterLayer

from ..helpers import state_hash
from ..swift_fixtures import FIXTURES, load_case, run_case
from ..tiny_models import llama_deep_prompt, tiny_llama
from .harness import ATOL, VISIBLE, build, equal, forward, randomized, reference


def test_lora_on_every_linear_layer_stays_on_inside_an_adapter_added_on_mlp():
    # The adapter's injection hid LoRA's layers and put them back on the adapter's layer, where nothing calls them.
    model, weights = randomized("llama", ["all_lora", "mlp_adapter"])
    mlp = model.model.model.layers[0].mlp
    assert isinstance(mlp, AdapterLayer) and isinstance(mlp.base_layer.down_proj, LoraLayer)
    model.set_active_adapters(["all_lora"])
    lora_alone = forward(build("llama", ["all_lora"], weights=weights), "llama")
    torch.testing.assert_close(forward(model, "llama"), lora_alone, atol=ATOL, rtol=0)
    model.set_active_adapters(["all_lora", "mlp_adapter"])
    expected = reference("llama", "all_lora", "mlp_adapter", weights)
    torch.testing.assert_close(forward(model, "llama"), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("model_key", "adapter", "prompt"),
    [("llama", "mlp_adapter", "llama_prompt"), ("bert", "ffc_adapter", "bert_prompt")],
)
def test_an_adapter_inside_the_layers_keeps_its_effect_after_prompts_are_added_on_them(model_key, adapter, prompt):
    # Prompt's injection put the adapter's layer back on the prompt layer: the adapter had no effect.
    model, weights = randomized(model_key, [adapter, prompt])
    model.set_active_adapters([adapter])
    alone = forward(build(model_key, [adapter], weights=weights), model_key)
    torch.testing.assert_close(forward(model, model_key), alone, atol=ATOL, rtol=0)
    model.set_active_adapters([adapter, prompt])
    torch.testing.assert_close(
        forward(model, model_key), reference(model_key, adapter, prompt, weights), atol=ATOL, rtol=0
    )


def test_ms_swift_checkpoint_of_an_ffn_adapter_and_prompts_on_bert_gives_ms_swift_outputs():
    case, base, io = load_case("bert_adapter_ffn_prompt")
    model = Swift.from_pretrained(base, FIXTURES / "bert_adapter_ffn_prompt" / "ckpt").eval()
    assert model.adapters == ["ffn_adapter", "vpt"]
    output = run_case(case, model, io).last_hidden_state
    torch.testing.assert_close(output, io["output.last_hidden_state"], atol=1e-5, rtol=0)


def test_ms_swift_ffn_adapter_and_prompts_give_the_same_outputs_loaded_the_other_way_round():
    # Both act on one BertLayer (its feed_forward_chunk, its forward), so the nesting order must not matter.
    case, base, io = load_case("bert_adapter_ffn_prompt")
    checkpoint = FIXTURES / "bert_adapter_ffn_prompt" / "ckpt"
    model = Swift.from_pretrained(base, checkpoint, adapter_name="vpt")
    model = Swift.from_pretrained(model, checkpoint, adapter_name="ffn_adapter").eval()
    assert model.adapters == ["vpt", "ffn_adapter"]
    output = run_case(case, model, io).last_hidden_state
    torch.testing.assert_close(output, io["output.last_hidden_state"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", [("down_adapter", "mlp_adapter"), ("mlp_adapter", "down_adapter")])
def test_two_adapters_of_one_type_coexist_when_one_wraps_a_parent_of_the_others_target(order):
    # PEFT's injection looked for the inner target under its plain name and failed ("Target modules ... not found").
    model, weights = randomized("llama", list(order))
    mlp = model.model.model.layers[0].mlp
    assert set(mlp.adapter_down) == {"mlp_adapter"} and set(mlp.base_layer.down_proj.adapter_down) == {"down_adapter"}
    for name in order:
        model.set_active_adapters([name])
        alone = forward(build("llama", [name], weights=weights), "llama")
        torch.testing.assert_close(forward(model, "llama"), alone, atol=ATOL, rtol=0)
    model.set_active_adapters(list(order))
    expected = reference("llama", "down_adapter", "mlp_adapter", weights)
    torch.testing.assert_close(forward(model, "llama"), expected, atol=ATOL, rtol=0)


def test_res_tuning_reads_its_stems_as_the_model_gets_them_whatever_the_order_and_after_a_delete():
    # Its feature hooks stayed on whatever was outermost when it was added: an adapter added later on a stem was
    # not seen, and deleting an adapter added earlier left the hooks on a layer that no longer ran.
    first, weights = randomized("vit", ["vit_adapter", "ln_restuning"])
    second = build("vit", ["ln_restuning", "vit_adapter"], weights=weights).eval()
    torch.testing.assert_close(forward(second, "vit"), forward(first, "vit"), atol=ATOL, rtol=0)
    alone = forward(build("vit", ["ln_restuning"], weights=weights), "vit")
    for model in (first, second):
        model.delete_adapter("vit_adapter")
        torch.testing.assert_close(forward(model, "vit"), alone, atol=0, rtol=0)


def test_a_method_adapter_added_after_prompts_on_its_layer_takes_effect():
    # It intercepted feed_forward_chunk on the prompt's layer, which the BERT layer never calls.
    model, weights = randomized("bert", ["bert_prompt", "ffc_adapter"])
    prompt_only = forward(build("bert", ["bert_prompt"], weights=weights), "bert")
    assert (forward(model, "bert") - prompt_only).abs().max() > VISIBLE
    other_order = build("bert", ["ffc_adapter", "bert_prompt"], weights=weights)
    torch.testing.assert_close(forward(model, "bert"), forward(other_order, "bert"), atol=ATOL, rtol=0)


def test_the_hand_composition_in_the_wrong_nesting_differs_from_the_model():
    # The references can tell orders apart: LoRA then an Adapter on one module is Adapter(LoRA(x)), not the reverse.
    model, weights = randomized("llama", ["o_lora", "o_adapter"])
    torch.testing.assert_close(
        forward(model, "llama"), reference("llama", "o_lora", "o_adapter", weights), atol=ATOL, rtol=0
    )
    assert (forward(model, "llama") - reference("llama", "o_adapter", "o_lora", weights)).abs().max() > VISIBLE


def test_merging_a_lora_that_wraps_an_active_adapter_is_refused_before_anything_changes():
    # LoRA added after an Adapter on one module computes from the Adapter's output; folded into the base weight it
    # would act before the Adapter (found by the matrix's merge check).
    model, weights = randomized("llama", ["o_adapter", "o_lora"])
    both, before = forward(model, "llama"), state_hash(model.model)
    with pytest.raises(ValueError, match=r"wraps the layer of \['o_adapter'\]"):
        model.merge(adapter_names=["o_lora"])
    assert state_hash(model.model) == before
    equal(forward(model, "llama"), both, "after the refusal")
    model.set_active_adapters(["o_lora"])  # with the Adapter off, merging computes the same
    model.merge(adapter_names=["o_lora"])
    lora_alone = forward(build("llama", ["o_lora"], weights=weights), "llama")
    torch.testing.assert_close(forward(model, "llama"), lora_alone, atol=ATOL, rtol=0)
    other_nesting = build("llama", ["o_lora", "o_adapter"], weights=weights)  # Adapter(LoRA(x)): merges exactly
    expected = forward(other_nesting, "llama")
    other_nesting.merge(adapter_names=["o_lora"])
    torch.testing.assert_close(forward(other_nesting, "llama"), expected, atol=ATOL, rtol=0)


def test_merging_one_of_two_active_adapters_in_one_lora_layer_is_refused():
    # PEFT's layer runs only its base weights once an adapter is merged: the other would silently stop acting.
    model, _ = randomized("llama", ["o_lora", "o_loraplus"])
    with pytest.raises(ValueError, match=r"without \['o_loraplus'\]"):
        model.merge(adapter_names=["o_lora"])
    expected = forward(model, "llama")
    model.merge(adapter_names=["o_lora", "o_loraplus"])
    torch.testing.assert_close(forward(model, "llama"), expected, atol=ATOL, rtol=0)


def test_llamapro_blocks_after_a_layer_that_passes_prompt_tokens_on_are_refused_before_any_change():
    # The blocks would run on the prompted hidden states (sequence + 4) with the model's own masks and rotary tables
    # (sequence): every forward failed deep in attention. Refused by name, with the order that works.
    base = tiny_llama(num_layers=4)
    width = base.config.hidden_size
    ids = torch.arange(9)[None].repeat(2, 1)
    mask = torch.ones_like(ids)
    model = Swift.prepare_model(base, {"prompt": llama_deep_prompt(dim=width)}).eval()
    before, modules_before = state_hash(model), [name for name, _ in model.named_modules()]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    refused = r"cannot add blocks after 'model\.layers\.1'.*add the LLaMA-PRO adapter before"
    with pytest.raises(ValueError, match=refused):
        model.add_adapter("pro", LlamaProConfig(num_new_blocks=2))
    assert state_hash(model) == before and [name for name, _ in model.named_modules()] == modules_before
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)
    with pytest.raises(ValueError, match="add the LLaMA-PRO adapter before"):
        Swift.prepare_model(
            tiny_llama(num_layers=4), {"p": llama_deep_prompt(dim=width), "pro": LlamaProConfig(num_new_blocks=2)}
        )


def test_llamapro_added_before_deep_prompts_runs_its_blocks_inside_the_prompted_layers():
    # the order the refusal names: the prompt layers wrap the blocks, which get the prompts' masks and positions
    base = tiny_llama(num_layers=4)
    ids = torch.arange(9)[None].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    configs = {"pro": LlamaProConfig(num_new_blocks=2), "prompt": llama_deep_prompt(dim=base.config.hidden_size)}
    model = Swift.prepare_model(base, configs).eval()
    torch.manual_seed(0)
    for parameter in model.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.2)
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=mask).logits
        model.set_active_adapters(["prompt"])
        prompt_only = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(both).all() and (both - prompt_only).abs().max() > 1e-4
