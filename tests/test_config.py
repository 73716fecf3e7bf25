from __future__ import annotations

from pathlib import Path

import pytest

from helpers import stop_embedded_server
from syncctl.config import EMBEDDED, mask_url, resolve_database, scrub_secrets, syncctl_home
from syncctl.errors import BadInput


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql://app:s3cret@db.example:5432/sync",
            "postgresql://app:***@db.example:5432/sync",
        ),
        ("postgresql://app@db.example/sync", "postgresql://app@db.example/sync"),
        (
            "postgresql:///sync?host=/run/pg&password=s3cret",
            "postgresql:///sync?host=/run/pg&password=***",
        ),
        ("host=db.example user=app password=s3cret dbname=sync", "password=***"),
    ],
)
def test_mask_url_hides_the_password(url: str, expected: str) -> None:
    assert expected in mask_url(url)
    assert "s3cret" not in mask_url(url)


def test_scrub_secrets_removes_the_password_from_a_message() -> None:
    url = "postgresql://app:s3cret@db.example/sync"
    assert scrub_secrets("auth failed for app:s3cret", url) == "auth failed for app:***"


def test_database_flag_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCCTL_DATABASE_URL", "postgresql://env-syncctl/db")
    monkeypatch.setenv("DATABASE_URL", "postgresql://env-generic/db")
    target = resolve_database("postgresql://flag/db")
    assert (target.url, target.source) == ("postgresql://flag/db", "--database-url")


def test_syncctl_database_url_wins_over_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCCTL_DATABASE_URL", "postgresql://env-syncctl/db")
    monkeypatch.setenv("DATABASE_URL", "postgresql://env-generic/db")
    assert resolve_database(None).source == "SYNCCTL_DATABASE_URL"
    monkeypatch.delenv("SYNCCTL_DATABASE_URL")
    assert resolve_database(None).source == "DATABASE_URL"


def test_malformed_database_url_is_bad_input_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SYNCCTL_DATABASE_URL", "host=db password=s3cret nonsense")
    with pytest.raises(BadInput) as caught:
        resolve_database(None)
    assert "SYNCCTL_DATABASE_URL" in caught.value.message
    assert "s3cret" not in caught.value.message


def test_repr_of_a_target_never_shows_the_url() -> None:
    target = resolve_database("postgresql://app:s3cret@db/sync")
    assert "s3cret" not in repr(target)
    assert target.masked_url == "postgresql://app:***@db/sync"


def test_embedded_database_is_started_under_syncctl_home_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("SYNCCTL_DATABASE_URL", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SYNCCTL_HOME", str(tmp_path / "home"))
    assert syncctl_home() == tmp_path / "home"
    import psycopg

    first = resolve_database(None)
    assert first.source == EMBEDDED
    try:
        with psycopg.connect(first.url) as conn:
            pid = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
        # A second command finds the same server running instead of starting another.
        second = resolve_database(None)
        with psycopg.connect(second.url) as conn:
            assert conn.execute("SELECT pg_postmaster_start_time()").fetchone() == pid
        assert (tmp_path / "home" / "pgdata" / "PG_VERSION").exists()
    finally:
        stop_embedded_server(tmp_path / "home" / "pgdata")


def test_unparsable_url_is_bad_input_and_its_password_is_scrubbed() -> None:
    with pytest.raises(BadInput) as caught:
        resolve_database("postgresql://app:s3cret@[bad")
    assert "s3cret" not in caught.value.message


def test_an_empty_password_is_not_shown_as_masked() -> None:
    assert mask_url("postgresql://postgres:@/postgres?host=/tmp/pg") == (
        "postgresql://postgres:@/postgres?host=/tmp/pg"
    )
