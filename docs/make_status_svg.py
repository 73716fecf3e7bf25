"""Draw docs/status-watch.svg from a real run: what `syncctl status --watch` shows.

    python docs/make_status_svg.py --database-url postgresql://postgres@127.0.0.1:5432/postgres

It creates a scratch database beside the one named, syncs four mailboxes from
the local Graph-compatible server with two `syncctl run` processes (one
mailbox throttled hard), takes the progress frame a few seconds in, and drops
the scratch database.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from rich.console import Console

from syncctl import progress, reports
from syncctl.config import DatabaseTarget
from syncctl.db import connection
from syncctl.fakegraph import FakeGraphServer
from syncctl.graph import GraphMailSource, GraphSettings
from syncctl.jobs import add_store, create_job
from syncctl.migrate import migrate

MAILBOXES = {
    "ann@contoso.test": 60_000,
    "sales@contoso.test": 40_000,
    "legal@contoso.test": 30_000,
    "support@contoso.test": 20_000,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("status-watch.svg"))
    parser.add_argument("--after", type=float, default=6.0, help="seconds of syncing first")
    args = parser.parse_args()

    scratch = f"syncctl_svg_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(scratch)))
    url = psycopg.conninfo.make_conninfo(args.database_url, dbname=scratch)
    target = DatabaseTarget(url, "--database-url")
    try:
        record(target, args.out, args.after)
    finally:
        with psycopg.connect(args.database_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(scratch)))


def record(target: DatabaseTarget, out: Path, after: float) -> None:
    with FakeGraphServer(MAILBOXES, seed=11, latency=0.05) as server:
        server.add_mailbox("legal@contoso.test", 30_000, throttle_rate=0.6, retry_after=0.3)
        source = GraphMailSource(GraphSettings(url=server.url, token=server.token))
        with connection(target) as conn:
            migrate(conn)
            for email in MAILBOXES:
                add_store(conn, name=email.split("@")[0].title(), email=email)
                create_job(conn, source, store_ref=email, chunk_size=2000)
        env = {
            **os.environ,
            "SYNCCTL_DATABASE_URL": target.url,
            "SYNCCTL_GRAPH_URL": server.url,
            "SYNCCTL_GRAPH_TOKEN": server.token,
        }
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "syncctl", "run", "--concurrency", "2"],
                env=env,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(2)
        ]
        try:
            meter = progress.RateMeter()
            with connection(target) as conn:
                deadline = time.monotonic() + after
                jobs: list[progress.JobProgress] = []
                while time.monotonic() < deadline:
                    jobs = meter.measure(reports.job_rows(conn, active=True))
                    time.sleep(1)
            with open(os.devnull, "w") as devnull:
                console = Console(record=True, width=118, force_terminal=True, file=devnull)
                console.print("$ syncctl status --watch")
                console.print(progress.render(jobs))
            out.write_text(console.export_svg(title="syncctl status --watch"), encoding="utf-8")
            print(f"wrote {out}")
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(timeout=60)
        source.close()


if __name__ == "__main__":
    main()
