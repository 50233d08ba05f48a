"""Tier 3: every test here needs root, `ip` and `nft`; missing ones fail loudly."""

from __future__ import annotations

import pytest

from tests.conftest import require_root_and_tools


@pytest.fixture(autouse=True)
def _tier3_prereqs() -> None:
    require_root_and_tools("ip", "nft")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/netns/" in str(item.fspath):
            item.add_marker(pytest.mark.netns)
