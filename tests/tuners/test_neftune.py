"""NEFTune: noise statistics, training-only, switching, mixing with other tuners, trainer double-noise guard."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_swift_ext import LlamaProConfig, NEFTuneConfig, Swift

from ..helpers import randomize_adapter, state_hash
from ..tiny_models import llama_inputs, tiny_llama


def llama_of_width(hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=4
    )
    return LlamaForCausalLM(config).eval()


def embedding_noise(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Training-mode output of the wrapped embeddings minus the plain embedding output."""
    embeddings = model.get_input_embeddings()
    embeddings.train()
    with torch.no_grad():
        return embeddings(input_ids) - embeddings.get_base_layer()(input_ids)


@pytest.mark.parametrize(("alpha", "length", "hidden"), [(5.0, 64, 32), (1.0, 64, 32), (5.0, 16, 32), (5.0, 64, 64)])
def test_noise_is_uniform_with_the_neftune_magnitude(alpha, length, hidden):
    model = get_peft_model(llama_of_width(hidden), NEFTuneConfig(noise_alpha=alpha))
    torch.manual_seed(0)
    noise = embedding_noise(model, llama_inputs(batch=8, length=length)["input_ids"])
    m = alpha / math.sqrt(length * hidden)
    assert noise.abs().max() <= m * (1 + 1e-5)
    assert noise.abs().max() >= 0.98 * m  # thousands of draws reach close to the bound
    standard_error = m / math.sqrt(3 * noise.numel())
    assert noise.mean().abs() <= 5 * standard_error
    assert noise.std().item() == pytest.approx(m / math.sqrt(3), rel=0.05)  # std of Uniform(-m, m)


def test_eval_outputs_are_untouched():
    inputs = llama_inputs()
    base = tiny_llama()(**inputs).logits
    model = get_peft_model(tiny_llama(), NEFTuneConfig()).eval()
    assert torch.equal(model(**inputs).logits, base)


def test_training_outputs_equal_lora_fed_with_the_same_noise():
    inputs = llama_inputs()
    lora = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    model = Swift.prepare_model(tiny_llama(), {"lora": lora, "noise": NEFTuneConfig(noise_alpha=3.0)}).train()
    reference = Swift.prepare_model(tiny_llama(), {"lora": LoraConfig(r=2, target_modules=["q_proj"])}).train()
    reference.load_adapter_weights("lora", model.adapter_state_dict("lora"), "test", "lora")
    torch.manual_seed(5)
    actual = model(**inputs).logits
    embeds = reference.get_input_embeddings()(inputs["input_ids"])
    torch.manual_seed(5)  # the embedding is the model's first draw from the generator
    m = 3.0 / math.sqrt(embeds.shape[1] * embeds.shape[2])
    noisy = embeds + torch.empty_like(embeds).uniform_(-m, m)
    torch.testing.assert_close(actual, reference(inputs_embeds=noisy).logits, atol=1e-6, rtol=0)


def test_noise_goes_on_the_embeddings_longlora_trains_and_follows_eval_mode():
    from peft_swift_ext import LongLoraConfig

    inputs = llama_inputs()
    longlora = LongLoraConfig(r=2, target_modules=["q_proj"], embedder_and_normalizer=("embed", "norm"))
    model = Swift.prepare_model(tiny_llama().eval(), {"longlora": longlora})
    model = Swift.prepare_model(model, {"noise": NEFTuneConfig(noise_alpha=5.0)})
    embeddings = model.get_input_embeddings()
    assert not embeddings.training  # created in training mode, the wrapper follows the eval model it joined
    trained_copy = embeddings.get_base_layer().modules_to_save["longlora"]
    with torch.no_grad():
        trained_copy.weight.add_(1.0)  # the noise must land on the copy LongLoRA trains, not the frozen original
        expected = trained_copy(inputs["input_ids"])
        assert torch.equal(embeddings(inputs["input_ids"]), expected)
        noise = embedding_noise(model, inputs["input_ids"])
        m = 5.0 / math.sqrt(inputs["input_ids"].shape[1] * expected.shape[-1])
        assert 0 < noise.abs().max() <= m * (1 + 1e-5)
        assert torch.equal(embeddings.get_base_layer()(inputs["input_ids"]), expected)


def test_deactivate_removes_the_noise_and_other_tuners_keep_working():
    inputs = llama_inputs()
    configs = {"pro": LlamaProConfig(num_new_blocks=2), "noise": NEFTuneConfig()}
    model = Swift.prepare_model(tiny_llama(num_layers=4), configs).train()
    randomize_adapter(model, "pro", seed=0)
    model.deactivate_adapter("noise")
    quiet = model(**inputs).logits
    assert torch.equal(model(**inputs).logits, quiet)
    model.activate_adapter("noise")
    assert (model(**inputs).logits - quiet).abs().max() > 1e-4
    model.eval()
    assert torch.equal(model(**inputs).logits, quiet)


def test_neftune_only_checkpoint_is_the_config_and_restores(tmp_path):
    model = Swift.prepare_model(tiny_llama(), {"noise": NEFTuneConfig(noise_alpha=2.0)})
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "noise" / "adapter_config.json").read_text())
    assert saved["noise_alpha"] == 2.0 and saved["target_modules"] == ["model.embed_tokens"]
    loaded = Swift.from_pretrained(tiny_llama(), tmp_path)
    torch.manual_seed(0)
    noise = embedding_noise(loaded, llama_inputs(batch=8, length=64)["input_ids"])
    assert noise.abs().max() == pytest.approx(2.0 / math.sqrt(64 * 32), rel=0.02)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocabulary = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=vocabulary, pad_token="t0", eos_token="t1")


def make_trainer(kind: str, model, output_dir, trainer_alpha: float | None):
    Dataset = pytest.importorskip("datasets").Dataset

    ids = llama_inputs(batch=4)["input_ids"].tolist()
    options = {"max_steps": 1, "per_device_train_batch_size": 2, "report_to": [], "use_cpu": True}
    if kind == "trl-sft":
        trl = pytest.importorskip("trl")
        args = trl.SFTConfig(output_dir, neftune_noise_alpha=trainer_alpha, **options)
        data = Dataset.from_dict({"input_ids": ids})
        return trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer())
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir, neftune_noise_alpha=trainer_alpha, **options)
    return Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))


@pytest.mark.parametrize("kind", ["hf-trainer", "trl-sft"])
def test_trainer_noise_on_top_is_refused(kind, tmp_path):
    trainer = make_trainer(kind, get_peft_model(tiny_llama(), NEFTuneConfig()), tmp_path, trainer_alpha=5.0)
    with pytest.raises(ValueError, match="neftune_noise_alpha=5.0 would add it a second time"):
        trainer.train()


def test_full_fine_tuning_with_neftune_trains_in_the_trainer(tmp_path):
    model = get_peft_model(tiny_llama(), NEFTuneConfig())
    for param in model.parameters():  # NEFTune has no weights: full fine-tuning with noise, as in ms-swift
        param.requires_grad_(True)
    assert make_trainer("hf-trainer", model, tmp_path, trainer_alpha=None).train().global_step == 1


def test_bad_settings_raise_before_the_model_changes():
    with pytest.raises(ValueError, match="NEFTuneConfig.noise_alpha"):
        NEFTuneConfig(noise_alpha=0)
    model = tiny_llama()
    before = state_hash(model)
    with pytest.raises(ValueError, match="NEFTuneConfig.target_modules selects 'lm_head'"):
        get_peft_model(model, NEFTuneConfig(target_modules=["lm_head"]))
    assert state_hash(model) == before and type(model.lm_head) is torch.nn.Linear


# --- full fine-tuning with noise: the trained base weights are part of the checkpoint ------------------------------


def train_full(model, steps: int = 3):
    """Unfreeze every parameter (full fine-tuning with noise) and run a few AdamW steps; eval logits after."""
    for param in model.parameters():
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = llama_inputs()["input_ids"]
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return eval_logits(model)


def eval_logits(model):
    model.eval()
    with torch.no_grad():
        return model(**llama_inputs()).logits


@pytest.mark.parametrize("tied", [False, True])
def test_peft_checkpoint_of_full_fine_tuning_holds_the_trained_base_weights(tmp_path, tied):
    from peft import PeftModel
    from safetensors.torch import load_file

    model = get_peft_model(tiny_llama(tie_word_embeddings=tied), NEFTuneConfig())
    trained = train_full(model)
    assert (trained - eval_logits(tiny_llama(tie_word_embeddings=tied))).abs().max() > 0.1, "training changed it"
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    base = dict(model.get_base_model().named_parameters())  # each tied tensor once
    expected = [f"base_model.neftune_{name.replace('.base_layer', '').replace('.', '-')}" for name in base]
    assert sorted(saved) == sorted(expected)
    loaded = PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=tied), tmp_path)
    assert torch.equal(eval_logits(loaded), trained)
    again = PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=tied), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(eval_logits(again), trained)


def test_peft_checkpoint_with_a_frozen_base_holds_no_weights(tmp_path):
    from safetensors.torch import load_file

    model = get_peft_model(tiny_llama(), NEFTuneConfig())
    model.get_base_model().lm_head.weight.requires_grad_(True)  # only the head trains: only the head is saved
    model.save_pretrained(tmp_path / "head")
    saved = load_file(str(tmp_path / "head" / "adapter_model.safetensors"))
    assert sorted(saved) == ["base_model.neftune_lm_head-weight"]
    get_peft_model(tiny_llama(), NEFTuneConfig()).save_pretrained(tmp_path / "frozen")
    assert load_file(str(tmp_path / "frozen" / "adapter_model.safetensors")) == {}


def test_load_adapter_into_the_live_adapter_restores_full_fine_tuning(tmp_path):
    """What the Trainer does on resume_from_checkpoint: load_adapter into the existing NEFTune adapter."""
    model = get_peft_model(tiny_llama(), NEFTuneConfig())
    trained = train_full(model)
    model.save_pretrained(tmp_path)
    fresh = get_peft_model(tiny_llama(), NEFTuneConfig())
    for param in fresh.parameters():
        param.requires_grad_(True)
    result = fresh.load_adapter(str(tmp_path), "default", is_trainable=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(eval_logits(fresh), trained)


def test_peft_checkpoint_of_full_fine_tuning_in_the_trainer_restores(tmp_path):
    from peft import PeftModel

    model = get_peft_model(tiny_llama(), NEFTuneConfig())
    for param in model.parameters():
        param.requires_grad_(True)
    trainer = make_trainer("hf-trainer", model, tmp_path / "run", trainer_alpha=None)
    trainer.train()
    trained = eval_logits(model)
    trainer.save_model(str(tmp_path / "saved"))
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    assert (trained - eval_logits(tiny_llama())).abs().max() > 1e-3, "one Trainer step changed the model"
    assert torch.equal(eval_logits(loaded), trained)


def test_a_base_weight_of_the_wrong_shape_is_refused(tmp_path):
    from peft import PeftModel
    from safetensors.torch import save_file

    model = get_peft_model(tiny_llama(), NEFTuneConfig())
    train_full(model, steps=1)
    model.save_pretrained(tmp_path)
    save_file({"base_model.neftune_lm_head-weight": torch.zeros(3, 3)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(RuntimeError, match="size mismatch for the base weight neftune_lm_head-weight"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("with_lora", [False, True])
def test_swift_checkpoint_of_full_fine_tuning_holds_the_whole_model(tmp_path, with_lora):
    adapters = {"noise": NEFTuneConfig()}
    if with_lora:
        adapters["lora"] = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    model = Swift.prepare_model(tiny_llama(), adapters)
    trained = train_full(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "configuration.json").read_text())["whole_model"] is True
    assert {"config.json", "model.safetensors"} <= {path.name for path in tmp_path.iterdir()}
    loaded = Swift.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(eval_logits(loaded), trained)


def test_swift_checkpoint_with_a_frozen_base_is_adapters_only_and_ignores_stale_model_files(tmp_path):
    model = Swift.prepare_model(tiny_llama(), {"noise": NEFTuneConfig()})
    train_full(model)
    model.save_pretrained(tmp_path)  # the whole model
    for param in model.parameters():
        param.requires_grad_(False)
    fresh = Swift.prepare_model(tiny_llama(), {"noise": NEFTuneConfig()})
    fresh.save_pretrained(tmp_path)  # the same folder, base frozen: the root model files left there are stale
    assert json.loads((tmp_path / "configuration.json").read_text())["whole_model"] is False
    assert torch.equal(eval_logits(Swift.from_pretrained(tiny_llama(), tmp_path)), eval_logits(tiny_llama()))
