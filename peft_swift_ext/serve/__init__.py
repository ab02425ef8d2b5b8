"""Serving many adapters at once: ``python -m peft_swift_ext.serve --model <folder> --adapters <folder>``.

See docs/guides/serving.md. Modules:

- :mod:`~peft_swift_ext.serve.engine`: tokenisation, left padding, one batched ``generate``, per-row results.
- :mod:`~peft_swift_ext.serve.batcher`: the dynamic batcher (no model, no web framework).
- :mod:`~peft_swift_ext.serve.loading`: the base model from a local folder, the adapters with PEFT or SWIFT.
- :mod:`~peft_swift_ext.serve.settings`: the limits and the batching window, checked before the model loads.
- :mod:`~peft_swift_ext.serve.schemas` and :mod:`~peft_swift_ext.serve.app`: the OpenAI-style HTTP API
  (needs the ``serve`` extra: ``pip install 'peft-swift-ext[serve]'``).

Importing this package imports neither torch nor the web framework; the sub-modules import what they need.
"""
