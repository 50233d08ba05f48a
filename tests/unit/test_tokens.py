"""Join tokens: hashed, expiring, single use, bound to one node or waypoint."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from config.tokens import TokenError, TokenStore

NOW = 1_800_000_000.0


def _store(tmp_path: Path) -> TokenStore:
    return TokenStore(tmp_path / "ambit.db")


def test_token_redeems_once_for_its_node(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        token = store.create("node-1", now=NOW)
        store.redeem(token, "node-1", now=NOW + 10)
        [info] = store.list()
        assert info.subject == "node-1" and info.used == NOW + 10


def test_only_the_hash_is_stored_and_the_file_is_private(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        token = store.create("node-1", now=NOW)
    db = tmp_path / "ambit.db"
    assert os.stat(db).st_mode & 0o777 == 0o600
    rows = sqlite3.connect(db).execute("SELECT * FROM join_tokens").fetchall()
    assert rows[0][0] == hashlib.sha256(token.encode()).hexdigest()
    secret = token.split(".", 1)[1]
    for path in tmp_path.iterdir():
        assert secret.encode() not in path.read_bytes(), path
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_expired_token_is_refused(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        token = store.create("node-1", ttl=600, now=NOW)
        with pytest.raises(TokenError) as err:
            store.redeem(token, "node-1", now=NOW + 600)
    assert str(err.value) == (
        "token expired: create a new one with `ambit token create --node node-1`"
    )


def test_default_lifetime_is_one_hour(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        token = store.create("node-1", now=NOW)
        assert store.list()[0].expires == NOW + 3600
        store.redeem(token, "node-1", now=NOW + 3599)


def test_token_for_another_node_is_refused_and_not_consumed(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        token = store.create("node-1", now=NOW)
        with pytest.raises(TokenError) as err:
            store.redeem(token, "node-2", now=NOW)
        assert str(err.value) == (
            "join token is bound to node node-1, not node node-2: "
            "create one with `ambit token create --node node-2`"
        )
        store.redeem(token, "node-1", now=NOW)  # still usable by its own node


def test_reused_token_is_refused(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        token = store.create("node-1", now=NOW)
        store.redeem(token, "node-1", now=NOW)
        with pytest.raises(TokenError) as err:
            store.redeem(token, "node-1", now=NOW + 1)
    assert str(err.value) == (
        "join token was already used (node node-1 joined with it): tokens are single use, "
        "create a new one with `ambit token create --node node-1`"
    )


def test_unknown_token_is_refused(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        store.create("node-1", now=NOW)
        with pytest.raises(TokenError, match="unknown join token: create one with"):
            store.redeem("ambit-join.not-a-real-token", "node-1", now=NOW)


def test_waypoint_tokens_are_bound_to_namespace_and_name(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        token = store.create("shop/waypoint", now=NOW)
        with pytest.raises(TokenError, match="bound to waypoint shop/waypoint, not node node-1"):
            store.redeem(token, "node-1", now=NOW)
        store.redeem(token, "shop/waypoint", now=NOW)
        expired = store.create("shop/waypoint", ttl=1, now=NOW)
        with pytest.raises(TokenError, match="--waypoint shop/waypoint"):
            store.redeem(expired, "shop/waypoint", now=NOW + 5)


def test_bad_subject_names_are_refused(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        with pytest.raises(ValueError, match="must be a lowercase DNS subdomain"):
            store.create("Node_1", now=NOW)
        with pytest.raises(ValueError, match="must be NAMESPACE/NAME"):
            store.create("shop/", now=NOW)
        with pytest.raises(ValueError, match="ttl must be positive"):
            store.create("node-1", ttl=0, now=NOW)


def test_tokens_survive_a_restart_and_concurrent_redeems_succeed_once(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        token = store.create("node-1", now=NOW)
    results: list[str] = []

    def redeem() -> None:
        with _store(tmp_path) as s:
            try:
                s.redeem(token, "node-1", now=NOW)
                results.append("ok")
            except TokenError:
                results.append("refused")

    threads = [threading.Thread(target=redeem) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] + ["refused"] * 5


def test_revoke_and_purge(tmp_path: Path) -> None:
    with _store(tmp_path) as store:
        a = store.create("node-1", now=NOW)
        store.create("node-2", ttl=10, now=NOW)
        info = next(i for i in store.list() if i.subject == "node-1")
        assert store.revoke(info.id)
        with pytest.raises(TokenError, match="unknown join token"):
            store.redeem(a, "node-1", now=NOW)
        assert store.purge(now=NOW + 8 * 86400) == 1
        assert store.list() == []
