"""A module no code imports: a test names it in a config's ``megatron_core`` and checks it was never imported."""
