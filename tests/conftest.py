"""Shared pytest setup. Fixtures live in tests/plugins/<topic>.py, one module per topic, so that
each stage's fixtures are found in one place; they are registered here."""

pytest_plugins = [
    "tests.plugins.media_factory",
    "tests.plugins.http_server",
    "tests.plugins.s3",
    "tests.plugins.comfy",
    "tests.plugins.fake_runpod",
    "tests.plugins.runpod_worker_api",
    "tests.plugins.worker",
]
