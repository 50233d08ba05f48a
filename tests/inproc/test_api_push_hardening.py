"""Hardening of the proxy config stream (15012): credential files, certificate renewal,
limits on unauthenticated connections."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from config.push import write_private, write_secret


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_private_files_replace_wider_ones_atomically(tmp_path: Path) -> None:
    path = tmp_path / "node-key.pem"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    inode = os.stat(path).st_ino
    write_private(path, b"new key")
    assert path.read_bytes() == b"new key"
    assert _mode(path) == 0o600, "an existing wider file must not keep its mode"
    assert os.stat(path).st_ino != inode, "replaced by rename, never truncated in place"
    assert [p.name for p in tmp_path.iterdir()] == ["node-key.pem"], "no temporary left"


def test_secrets_for_token_files_are_owner_only(tmp_path: Path) -> None:
    given = write_secret(tmp_path / "node-1.token", "abc.def#sha256:00")
    assert given == str(tmp_path / "node-1.token")
    assert _mode(Path(given)) == 0o600
    assert Path(given).read_text().strip() == "abc.def#sha256:00"
