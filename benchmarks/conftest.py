"""pytest configuration of the pytest-benchmark modules (``pytest benchmarks/``); ``pytest tests/`` does not load it.

* The ``MEDFAST_BENCH_*`` variables are checked when pytest starts (``pytest_common`` raises ``pytest.UsageError``):
  one error line instead of a traceback per module, or timings on the CPU labelled with a misspelled device.
* Without pytest-benchmark (not installed, or disabled with ``-p no:benchmark``) the benchmark tests are skipped with
  the way to get it, instead of one "fixture 'benchmark' not found" error per test.
"""

from __future__ import annotations

import pytest

PLUGIN_MISSING = ("pytest-benchmark is not installed or is disabled (-p no:benchmark): pip install pytest-benchmark "
                  "(medfast bench runs the suites without it)")


def pytest_configure(config: pytest.Config) -> None:
    import pytest_common  # noqa: F401  (checks the environment on import)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # the plugin registered (by its entry point, under the name -p no:benchmark blocks), not merely importable
    if config.pluginmanager.hasplugin("benchmark"):
        return
    skip = pytest.mark.skip(reason=PLUGIN_MISSING)
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
