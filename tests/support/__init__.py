"""Helpers shared by test modules anywhere in the tree, imported as ``tests.support.<module>`` (pytest
puts the repository root on ``sys.path``: ``pythonpath`` in pyproject.toml)."""
