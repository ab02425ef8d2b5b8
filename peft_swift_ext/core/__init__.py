"""What every tuner shares: the tuner layer and ``BaseTuner`` bases, module paths and slots, probes, checks.

Imports run one way: ``compat`` (PEFT's private state) <- ``core`` <- ``tuners`` <- ``conversion`` (ms-swift's
formats) <- ``swift`` (the facade); ``techniques`` and ``distributed`` use ``core`` and ``tuners`` only. See
``docs/architecture.md``.
"""
