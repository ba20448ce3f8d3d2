"""CUDA-only tests (skipped without CUDA). A package, so that its conftest does not shadow tests/conftest.py as the module `conftest`."""
