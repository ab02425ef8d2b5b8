"""A real fine-tuning demo: ``python -m peft_swift_ext.demo`` (or ``peft-swift-demo``); see ``README.md`` here.

Nothing here is imported by ``peft_swift_ext`` itself, and this module imports nothing optional.
"""
