"""Allocator tuning for HBONE relay processes."""

from __future__ import annotations

import platform

from ztunnel.hbone.tuning import tune_allocator


def test_tune_allocator_applies_on_glibc() -> None:
    applied = tune_allocator()
    assert applied == (platform.libc_ver()[0] == "glibc")
