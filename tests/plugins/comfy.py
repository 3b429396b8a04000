"""pytest plugin: comfy fixtures (see tests/conftest.py)."""
