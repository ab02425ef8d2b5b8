import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.llama import modeling_llama

from peft_swift_ext.techniques.liger import apply_liger_kernel

pytest.importorskip("liger_kernel")


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="needs plain CPU")
def test_cpu_without_interpreter_is_refused_before_patching(llama):
    module_before, instance_before = dict(vars(modeling_llama)), dict(vars(llama))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        apply_liger_kernel(llama)
    assert dict(vars(modeling_llama)) == module_before and dict(vars(llama)) == instance_before


def test_unsupported_architecture_is_refused():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="no kernels for model type 'gpt2'"):
        apply_liger_kernel(model)


def test_missing_liger_kernel_names_the_extra(llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)
    with pytest.raises(ImportError, match=r"peft-swift-ext\[liger\]"):
        apply_liger_kernel(llama)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this is the launcher")
def test_kernels_under_the_triton_interpreter():
    """Triton reads TRITON_INTERPRET when liger-kernel is imported, so the interpreted tests get a fresh process."""
    interpreted = Path(__file__).with_name("test_liger_interpreted.py")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(interpreted)],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
