"""Test configuration: hypothesis profiles (``HYPOTHESIS_PROFILE=dev`` for more examples)."""

import os

from hypothesis import HealthCheck, settings

# pytester drives the onwards_trio.testing plugin in tests/testing/.
pytest_plugins = ["pytester"]

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
