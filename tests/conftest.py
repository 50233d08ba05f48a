"""Shared test setup: async tests run under uvloop; tier-3 tests demand root and tools."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import uvloop


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run `async def` tests on a fresh uvloop event loop (no plugin needed)."""
    fn: Callable[..., Any] = pyfuncitem.obj
    if not inspect.iscoroutinefunction(fn):
        return None
    argnames = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in argnames}
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(fn(**kwargs))
    return True


def require_root_and_tools(*tools: str) -> None:
    """Fail (never skip) when a tier-3 prerequisite is missing: CI must run this tier."""
    if os.geteuid() != 0:
        pytest.fail("tier-3 network-namespace tests need root: run `make test` as root")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: `make test` installs them (apt-get install)")
