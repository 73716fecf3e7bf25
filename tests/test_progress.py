"""The live progress view: rates and ETAs, the frame, plain lines, and watching real jobs."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from rich.console import Console

from fakes import CountOnly
from syncctl import jobs, progress, queue, reports
from syncctl.config import DatabaseTarget
from syncctl.db import Connection, connect
from syncctl.errors import BadInput

LEASE = timedelta(seconds=60)
START = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
RED = "\x1b[1;31m"


def report_row(**changes: Any) -> dict[str, Any]:
    """A row as reports.job_rows returns it: a job running since START, sampled at START."""
    row: dict[str, Any] = {
        "job_id": UUID(int=1),
        "store_name": "Ann",
        "store_email": "ann@example.com",
        "status": "processing",
        "chunks_done": 1,
        "chunks_failed": 0,
        "total_chunks": 4,
        "emails_synced": 0,
        "estimated_emails": 10_000,
        "retried": 0,
        "stuck_chunks": [],
        "created_at": START,
        "started_at": START,
        "completed_at": None,
        "synced_through": None,
        "sampled_at": START,
    }
    row.update(changes)
    return row


def at(seconds: float, synced: int, **changes: Any) -> dict[str, Any]:
    return report_row(
        sampled_at=START + timedelta(seconds=seconds), emails_synced=synced, **changes
    )


def new_job(conn: Connection, email: str, *, messages: int = 2000) -> UUID:
    jobs.add_store(conn, name=email.split("@", maxsplit=1)[0], email=email)
    created = jobs.create_job(conn, CountOnly(messages), store_ref=email, chunk_size=1000)
    return created.job_id


def claim(conn: Connection, worker: str = "w1") -> queue.Chunk:
    chunk = queue.claim_chunk(conn, worker_id=worker, lease=LEASE)
    assert chunk is not None
    return chunk


def terminal(width: int = 120) -> Console:
    return Console(
        file=io.StringIO(), width=width, force_terminal=True, color_system="standard", record=True
    )


def piped() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=100, color_system=None), out


# rates and ETAs


def test_rate_is_measured_between_refreshes_and_gives_the_eta() -> None:
    meter = progress.RateMeter()
    meter.measure([at(10, 1000)])

    [job] = meter.measure([at(12, 3000)])

    assert job.rate == pytest.approx(1000.0)  # 2000 messages in 2 s
    assert job.eta == timedelta(seconds=7)  # 7000 left at 1000/s


def test_first_refresh_rate_is_the_average_since_the_job_started() -> None:
    [job] = progress.RateMeter().measure([at(20, 5000)])

    assert job.rate == pytest.approx(250.0)
    assert job.eta == timedelta(seconds=20)


def test_rate_forgets_refreshes_older_than_its_window() -> None:
    meter = progress.RateMeter(window=timedelta(seconds=5))
    meter.measure([at(0, 0)])
    meter.measure([at(5, 5000)])

    [job] = meter.measure([at(10, 5000)])  # nothing synced for the last 5 s

    assert job.rate == 0
    assert job.eta is None


def test_finished_job_shows_its_average_rate_and_no_eta() -> None:
    [job] = progress.RateMeter().measure(
        [
            at(
                60,
                9000,
                status="completed",
                chunks_done=4,
                completed_at=START + timedelta(seconds=30),
                synced_through=START,
            )
        ]
    )

    assert job.rate == pytest.approx(300.0)
    assert job.eta is None
    assert progress.plain_line(job).endswith(f"ETA -, synced through {START:%Y-%m-%d %H:%M:%S}Z")


def test_job_not_started_has_no_rate_yet() -> None:
    [job] = progress.RateMeter().measure([report_row(status="pending", started_at=None)])

    assert job.rate is None
    assert job.eta is None


# the frame


def stuck_and_healthy() -> list[progress.JobProgress]:
    return progress.RateMeter().measure(
        [
            at(
                10,
                3000,
                job_id=UUID(int=1),
                store_email="stuck@example.com",
                stuck_chunks=[
                    {"chunk_index": 2, "worker_id": "host:42:ab", "reason": "lease expired"}
                ],
            ),
            at(
                10,
                4000,
                job_id=UUID(int=2),
                store_email="fine@example.com",
                synced_through=START,
            ),
        ]
    )


def test_frame_highlights_and_names_stuck_chunks() -> None:
    console = terminal()

    console.print(progress.render(stuck_and_healthy()))

    text = console.export_text(clear=False)
    assert "⚠ stuck@example.com chunk 2/4 stuck: lease expired (worker host:42:ab)" in text
    styled = console.export_text(styles=True).splitlines()
    [stuck_row] = [line for line in styled if "stuck@example.com" in line and "⚠" not in line]
    [fine_row] = [line for line in styled if "fine@example.com" in line]
    assert RED in stuck_row
    assert RED not in fine_row
    assert "processing" in fine_row


def test_frame_shows_chunks_messages_rate_eta_failed_and_retried() -> None:
    console = terminal()
    [job] = progress.RateMeter().measure(
        [at(10, 2500, chunks_failed=1, retried=3, synced_through=START)]
    )

    console.print(progress.render([job]))

    [header, row] = console.export_text().splitlines()[:2]
    assert header.split() == [
        "store",
        "status",
        "chunks",
        "done",
        "messages",
        "rate",
        "ETA",
        "failed",
        "retried",
        "synced",
        "through",
    ]
    assert row.split()[-8:] == [
        "2/4",
        "2,500/10,000",
        "250/s",
        "30s",
        "1",
        "3",
        f"{START:%Y-%m-%d}",
        f"{START:%H:%M:%S}Z",
    ]


def test_frame_takes_two_lines_per_job_on_a_narrow_terminal() -> None:
    console = terminal(width=60)

    console.print(progress.render(stuck_and_healthy()))

    lines = console.export_text().splitlines()
    assert all(len(line) <= 60 for line in lines)
    assert lines[1].strip() == "3,000/10,000 messages, 300/s, ETA 24s, 0 failed, 0 retried"
    assert "stuck" in lines[0]
    # A watermark, once there is one, on a line of its own.
    assert lines[4].strip() == f"synced through {START:%Y-%m-%d %H:%M:%S}Z"


def test_frame_without_jobs_says_so() -> None:
    console = terminal()

    console.print(progress.render([]))

    assert console.export_text().strip() == "No job is pending or processing."


def test_no_color_keeps_colour_out_of_the_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True)

    console.print(progress.render(stuck_and_healthy()))

    assert "stuck@example.com" in out.getvalue()
    assert "31m" not in out.getvalue()  # red, in every form


# the report behind it


def test_job_rows_name_stuck_chunks_and_count_retried_attempts(conn: Connection) -> None:
    job_id = new_job(conn, "a@example.com", messages=3000)
    first = claim(conn)
    queue.finish_chunk(conn, first, "error", error="boom", retry_base=timedelta(0))
    again = claim(conn, "w2")
    conn.execute(
        "UPDATE chunked_sync_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        [again.id],
    )

    [row] = reports.job_rows(conn, job_ids=[job_id])

    assert row["retried"] == 1
    [stuck] = row["stuck_chunks"]
    assert (stuck["chunk_index"], stuck["worker_id"], stuck["reason"]) == (1, "w2", "lease expired")


def test_job_rows_call_a_chunk_stuck_after_five_minutes_even_with_a_live_lease(
    conn: Connection,
) -> None:
    job_id = new_job(conn, "a@example.com")
    chunk = claim(conn)
    conn.execute(
        "UPDATE chunked_sync_jobs SET started_at = now() - interval '6 minutes' WHERE id = %s",
        [chunk.id],
    )

    [row] = reports.job_rows(conn, job_ids=[job_id])

    assert [s["reason"] for s in row["stuck_chunks"]] == ["processing too long"]


def test_job_rows_leave_out_reaped_attempts_that_used_the_last_try(conn: Connection) -> None:
    jobs.add_store(conn, name="a", email="a@example.com")
    job_id = jobs.create_job(
        conn, CountOnly(1000), store_ref="a@example.com", max_attempts=1
    ).job_id
    chunk = claim(conn)
    conn.execute(
        "UPDATE chunked_sync_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        [chunk.id],
    )
    queue.reap(conn)

    [row] = reports.job_rows(conn, job_ids=[job_id])

    assert (row["status"], row["chunks_failed"], row["retried"]) == ("failed", 1, 0)


# watching


@pytest.fixture
def finisher(target: DatabaseTarget) -> Iterator[Any]:
    """Runs a job's chunks to completion in a thread, after `delay` seconds."""
    threads: list[threading.Thread] = []

    def start(job_id: UUID, *, delay: float) -> None:
        def work() -> None:
            with connect(target) as conn:
                threading.Event().wait(delay)
                while (chunk := queue.claim_chunk(conn, worker_id="w1", lease=LEASE)) is not None:
                    assert chunk.parent_sync_job_id == job_id
                    queue.finish_chunk(conn, chunk, "completed")

        thread = threading.Thread(target=work)
        thread.start()
        threads.append(thread)

    yield start
    for thread in threads:
        thread.join(timeout=30)


def test_watch_prints_plain_lines_when_piped_until_the_jobs_finish(
    conn: Connection, target: DatabaseTarget, finisher: Any
) -> None:
    job_id = new_job(conn, "a@example.com")
    finisher(job_id, delay=0.3)
    console, out = piped()

    end = progress.watch(target, interval=0.05, console=console)

    assert end == "finished"
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"a@example.com job {job_id} pending: chunks 0/2")
    assert lines[-1].startswith(f"a@example.com job {job_id} completed: chunks 2/2")
    assert sum("completed" in line for line in lines) == 1  # a finished job is printed once
    assert "\x1b[" not in out.getvalue()


def test_watch_redraws_on_a_terminal_and_leaves_the_last_frame(
    conn: Connection, finisher: Any
) -> None:
    job_id = new_job(conn, "a@example.com")
    finisher(job_id, delay=0.3)
    console = terminal()

    end = progress.watch(conn, job_id=job_id, interval=0.05, console=console)

    assert end == "finished"
    last_frame = console.export_text().strip().splitlines()[-1]
    assert last_frame.split()[:2] == ["a@example.com", "completed"]


def test_watch_keeps_showing_a_job_that_finished_while_others_run(conn: Connection) -> None:
    done = new_job(conn, "done@example.com", messages=1000)
    running = new_job(conn, "running@example.com")
    chunk = claim(conn)
    refreshes = 0

    def until() -> bool:
        nonlocal refreshes
        refreshes += 1
        if refreshes == 1:
            queue.finish_chunk(conn, chunk, "completed")
        return refreshes > 3

    console, out = piped()

    end = progress.watch(conn, interval=0.01, console=console, until=until)

    assert end == "until"
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"done@example.com job {done} processing")
    assert sum(line.startswith(f"done@example.com job {done} completed") for line in lines) == 1
    # The running job is printed at every refresh, the one that finished only once more.
    assert sum(f"job {running} pending" in line for line in lines) >= 2


def test_watch_ends_when_until_turns_true(conn: Connection) -> None:
    job_id = new_job(conn, "a@example.com")
    calls = iter(range(2))
    console, out = piped()

    end = progress.watch(
        conn, job_id=[job_id], interval=5, console=console, until=lambda: next(calls, None) is None
    )

    assert end == "until"
    assert f"job {job_id} pending" in out.getvalue()


def test_watch_ends_quietly_on_ctrl_c(conn: Connection) -> None:
    new_job(conn, "a@example.com")

    def interrupt() -> bool:
        raise KeyboardInterrupt

    assert progress.watch(conn, interval=1, console=piped()[0], until=interrupt) == "interrupted"


def test_watch_with_nothing_active_says_so_and_returns(
    conn: Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    console, out = piped()

    assert progress.watch(conn, console=console) == "finished"

    assert out.getvalue() == ""
    assert "No job is pending or processing" in capsys.readouterr().err


def test_watch_of_an_unknown_job_is_bad_input(conn: Connection) -> None:
    with pytest.raises(BadInput, match="No job"):
        progress.watch(conn, job_id=uuid4(), console=piped()[0])
