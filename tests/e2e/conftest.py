"""The end-to-end tests reuse the worker tests' stacks (tests/worker/conftest.py)."""

from tests.worker.conftest import embedded_stack, production_stack, stack

__all__ = ["embedded_stack", "production_stack", "stack"]
