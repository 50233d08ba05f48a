"""`ztunnel` command line: help, and one-line errors with a non-zero exit on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = str(Path(__file__).parents[2])


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ztunnel", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, check=False)


def test_help() -> None:
    r = run("--help")
    assert r.returncode == 0 and "--local-config" in r.stdout and "--token-file" in r.stdout


def test_bad_inputs_exit_non_zero_with_one_line(tmp_path: Path) -> None:
    missing = run("--node", "n1", "--local-config", str(tmp_path / "nope.json"),
                  "--data-dir", str(tmp_path / "d"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "nope.json" in missing.stderr
    other = tmp_path / "other.json"
    other.write_text('{"version": 1, "node": "n2"}')
    wrong = run("--node", "n1", "--local-config", str(other), "--data-dir", str(tmp_path / "d"))
    assert wrong.returncode == 2 and "'n2'" in wrong.stderr
    no_token = run("--node", "n1", "--control-plane", "127.0.0.1:1", "--data-dir",
                   str(tmp_path / "d"))
    assert no_token.returncode == 2 and "--token" in no_token.stderr
    bad_file = run("--node", "n1", "--control-plane", "127.0.0.1:1", "--token-file",
                   str(tmp_path / "t"))
    assert bad_file.returncode == 2 and "--token-file" in bad_file.stderr
    assert run("--node", "n1").returncode == 2  # no config source
