"""Examples a user copies: LightningModules, DataModules and CLI configs for DANA.

Run them from the repository root as modules, e.g.
``python -m examples.mnist1d.train fit --config examples/mnist1d/config.yaml``.
"""
