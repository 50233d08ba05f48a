"""The operations guide stays true to the repository: the diagram is rendered from its
source, and every repository path and unit the guide names exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


def test_architecture_png_is_rendered_from_its_source() -> None:
    png = (DOCS / "architecture.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n"), "docs/architecture.png is not a PNG"
    r = subprocess.run(["bash", str(DOCS / "render.sh"), "--check"], capture_output=True,
                       text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr


def test_operations_guide_names_only_existing_paths() -> None:
    text = (DOCS / "operations.md").read_text()
    paths = set(re.findall(r"`((?:deploy|systemd|docs|config|tests|ztunnel|netsetup)/"
                           r"[A-Za-z0-9_./@-]+)`", text))
    paths |= set(re.findall(r"\]\(((?!https?:)[A-Za-z0-9_./-]+)\)", text))
    assert len(paths) >= 8
    for p in sorted(paths):
        base = REPO / p if not p.startswith("architecture") else DOCS / p
        assert base.exists(), f"docs/operations.md names {p}, which does not exist"


def test_operations_guide_names_the_real_units() -> None:
    text = (DOCS / "operations.md").read_text()
    units = set(re.findall(r"\b([a-z-]+(?:@)?\.service)\b", text))
    assert {"ambit-control-plane.service", "ztunnel.service"} <= units
    for u in units:
        name = re.sub(r"@.*\.service$", "@.service", u)
        assert (REPO / "systemd" / name).exists(), f"no unit file for {u}"
