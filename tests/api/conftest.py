"""Fixtures of tests/api (the helpers are in apitest.py).

Every test gets a timeout; the ``servers`` fixture stops what a test started and checks
that no luanbd process printed a Python ``Traceback``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from apitest import HERE, TEST_TIMEOUT, Servers


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT))


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path)
    try:
        yield s
    finally:
        s.close_all()
    # nbdkit's Python plugin prints tracebacks by design; luanbd (and luanbd commands) never.
    text = s.stderr("luanbd") + s.stderr("cmd")
    assert "Traceback" not in text, text
