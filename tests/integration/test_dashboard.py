"""``taskguard dashboard`` in a real browser: a real sidecar process, a real dashboard process, Debian's chromium.

Chromium is driven by Playwright (``executable_path``: no browser download). Every wait is on the page's
elements or the sidecar's answers, under a timeout; figures (render and filter times) are printed, and only
generous bounds are asserted. The page reads nothing without the dashboard's viewer token: the tests type it
in, as a person would, and try every route without it, also as another OS user (``nobody``).

The page as operators use it (issue 20) is tried at a laptop's 1280x720 and a desktop's 1920x1080
(``BOTH_SIZES``). Where time must pass in the page (ages, staleness, a result line that clears), the page's
clock is Playwright's and jumps forward (``page.clock.fast_forward``): nothing waits for the wall clock.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from aiohttp import web
from grpc import aio
from playwright.async_api import Browser, Page, async_playwright, expect

from taskguard_client import AsyncClient, Conflict, EventType, GuardEvent, GuardState, Lease, RunStatus
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import ROOT, SidecarProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OPERATOR_TOKEN = "op-dash-5c1e9a7f3b2d4e60"
START_TIMEOUT_S = 20.0
TIMEOUT_MS = 10_000
ACTION_HEADERS = {"X-TaskGuard-Dashboard": "1"}
# A laptop and a desktop screen.
SIZES = [(1280, 720), (1920, 1080)]
BOTH_SIZES = pytest.mark.parametrize(
    "viewport", [pytest.param(size, id=f"{size[0]}x{size[1]}") for size in SIZES], indirect=True
)

expect.set_options(timeout=TIMEOUT_MS)


# --- processes -------------------------------------------------------------------------------


@dataclass
class DashboardProcess:
    """``python -m taskguard dashboard`` on an ephemeral loopback port, with a viewer token file of its own."""

    process: asyncio.subprocess.Process
    url: str
    log_path: Path
    viewer_token_path: Path
    #: As the file held it when this dashboard started.
    viewer_token: str

    def viewer(self, **headers: str) -> dict[str, str]:
        """Request headers that present the viewer token (plus ``headers``)."""
        return {"Authorization": f"Bearer {self.viewer_token}", **headers}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.terminate()
        return await asyncio.wait_for(self.process.wait(), START_TIMEOUT_S)


@dataclass
class Dashboards:
    workdir: Path
    started: list[DashboardProcess] = field(default_factory=list)

    async def start(
        self, address: str, *extra: str, listen: str = "127.0.0.1:0", token_path: Path | None = None
    ) -> DashboardProcess:
        log_path = self.workdir / f"dashboard-{len(self.started) + 1}.log"
        # Absent at first: the dashboard creates it (mode 0600) with a random token.
        token_path = token_path or self.workdir / f"viewer-{len(self.started) + 1}.token"
        command = [sys.executable, "-m", "taskguard", "dashboard", "--addr", address, "--listen", listen]
        command += ["--viewer-token-file", str(token_path)]
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *command, *extra, stdout=asyncio.subprocess.PIPE, stderr=log, cwd=ROOT
            )
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_S)).decode()
        assert "serving http://" in line, f"{line!r}; log: {log_path.read_text()}"
        words = line.split()
        assert f"the page asks for the viewer token in {token_path}" in line, line
        token = token_path.read_text().strip()
        dashboard = DashboardProcess(process, words[words.index("serving") + 1], log_path, token_path, token)
        assert token_path.stat().st_mode & 0o777 == 0o600
        self.started.append(dashboard)
        return dashboard


@pytest.fixture
def token_file(workdir: Path) -> Path:
    path = workdir / "operator.token"
    path.write_text(OPERATOR_TOKEN + "\n")
    return path


@pytest.fixture
def guarded(sidecar_factory: Callable[..., SidecarProcess], token_file: Path) -> SidecarProcess:
    """A sidecar with an operator token; its own uid (ours) is an operator too, as by default."""
    return sidecar_factory("--operator-token-file", str(token_file))


@pytest.fixture
async def dashboards(workdir: Path) -> AsyncIterator[Dashboards]:
    started = Dashboards(workdir)
    yield started
    for dashboard in started.started:
        code = await dashboard.stop()
        assert code == 0, dashboard.log()
        log = dashboard.log()
        assert OPERATOR_TOKEN not in log, "the operator token reached the dashboard's log"
        assert dashboard.viewer_token not in log, "the viewer token reached the dashboard's log"
        assert "Traceback" not in log, log
        # Its own stop, or a watch it closed itself, is no outage of the sidecar's.
        assert "Locally cancelled" not in log and "broke: CANCELLED" not in log, log


@pytest.fixture
async def dashboard(guarded: SidecarProcess, dashboards: Dashboards) -> DashboardProcess:
    return await dashboards.start(guarded.address)


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: python3 .ci/dev.py setup installs Debian's chromium")
    return CHROMIUM


@pytest.fixture(scope="module")
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    """One chromium for the module (launching one costs seconds on a loaded machine); a context per page."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def viewport(request: pytest.FixtureRequest) -> tuple[int, int]:
    """The page's size: a laptop's unless the test runs at ``BOTH_SIZES``."""
    size: tuple[int, int] = getattr(request, "param", SIZES[0])
    return size


class OpenPage(Protocol):
    def __call__(self, url: str, *, timezone_id: str | None = None, clock: bool = False) -> Awaitable[Page]: ...


@pytest.fixture
async def open_page(browser: Browser, viewport: tuple[int, int]) -> AsyncIterator[OpenPage]:
    """Open the dashboard in a fresh browser context; fail the test on any script error in the page.

    ``timezone_id``: the browser's zone; ``clock``: the page's clock is Playwright's (it runs on, and tests
    jump it forward).
    """
    errors: list[str] = []
    contexts = []

    async def open_(url: str, *, timezone_id: str | None = None, clock: bool = False) -> Page:
        width, height = viewport
        context = await browser.new_context(viewport={"width": width, "height": height}, timezone_id=timezone_id)
        contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        if clock:
            await page.clock.install()
        await page.goto(url)
        return page

    yield open_
    for context in contexts:
        await context.close()
    assert errors == [], errors


async def unlock(page: Page, dashboard: DashboardProcess) -> None:
    """Give the page the viewer token, as a person pastes it."""
    await expect(page.locator("#locked")).to_be_visible()
    await page.fill("#viewer-token", dashboard.viewer_token)
    await page.click("#unlock")
    await expect(page.locator("#locked")).to_be_hidden()


async def live_page(open_page: OpenPage, dashboard: DashboardProcess, **options: Any) -> Page:
    page = await open_page(dashboard.url, **options)
    await unlock(page, dashboard)
    await expect(page.locator("#connection")).to_have_attribute("data-state", "up")
    assert dashboard.viewer_token not in page.url
    return page


def row(page: Page, task_key: str) -> Any:
    return page.locator(f'tr.row[data-task-key="{task_key}"]')


def feed(page: Page, task_key: str, event_type: EventType) -> Any:
    """The feed's entries for these events (inside a group of refusals too)."""
    return page.locator(f'#feed li.event[data-task-key="{task_key}"][data-type="{event_type.value}"]')


async def revisions(page: Page, selector: str) -> list[int]:
    """The revisions of the events a list shows, oldest first (the page shows them newest first)."""
    shown: list[int] = await page.eval_on_selector_all(
        f"{selector} li.event", "items => items.map(item => Number(item.dataset.revision))"
    )
    return shown[::-1]


async def logged(client: AsyncClient, prefix: str, through: int, task_key: str | None = None) -> list[int]:
    """The revisions of the sidecar's event log under ``prefix`` (of ``task_key`` only, if given), to ``through``."""
    found: list[int] = []

    async def read() -> None:
        async with client.watch(prefix, start_revision=1) as events:
            async for event in events:
                if task_key is None or event.guard.task_key == task_key:
                    found.append(event.revision)
                if event.revision >= through:
                    return

    await asyncio.wait_for(read(), START_TIMEOUT_S)
    return found


async def next_event(client: AsyncClient, task_key: str, event_type: EventType, after: int) -> GuardEvent:
    """The first ``event_type`` event of ``task_key`` after revision ``after``, as the sidecar's watch tells it."""

    async def find() -> GuardEvent:
        async with client.watch(task_key, start_revision=after + 1) as events:
            async for event in events:
                if event.type is event_type and event.guard.task_key == task_key:
                    return event
        raise AssertionError("the watch ended")

    return await asyncio.wait_for(find(), START_TIMEOUT_S)


async def failed_guard(client: AsyncClient, task_key: str) -> Lease:
    lease = await client.acquire(task_key, holder="worker-1")
    await client.release(lease.lease_id, RunStatus.FAILED, "exit code 3")
    return lease


# --- tests -----------------------------------------------------------------------------------


async def test_a_guard_acquired_over_grpc_appears_within_a_second_and_its_release_shows(
    guarded: SidecarProcess, dashboard: DashboardProcess, open_page: OpenPage, key: str
) -> None:
    page = await live_page(open_page, dashboard)
    async with AsyncClient(guarded.address) as client:
        lease = await client.acquire(key, holder="worker-7", ttl=300)
        acquired_at = time.monotonic()
        await expect(row(page, key)).to_be_visible(timeout=1000)
        print(f"\ndashboard: acquired guard on the page {1000 * (time.monotonic() - acquired_at):.0f} ms later")
        guard_row = row(page, key)
        await expect(guard_row.locator("td.c-key")).to_have_text(key)
        await expect(guard_row.locator("td.c-state")).to_have_text("RUNNING")
        await expect(guard_row.locator("td.c-run")).to_have_attribute("title", lease.run_id)
        await expect(guard_row.locator("td.c-run")).to_have_text(f"{lease.run_id[:8]}…")
        await expect(guard_row.locator("td.c-holder")).to_have_text("worker-7")
        await expect(guard_row.locator("td.c-token")).to_have_text(str(lease.fencing_token))
        await expect(feed(page, key, EventType.ACQUIRED)).to_have_count(1)

        await client.release(lease.lease_id, RunStatus.SUCCEEDED)
        await expect(row(page, key)).to_have_attribute("data-state", "SUCCEEDED")
        await expect(guard_row.locator("td.c-state")).to_have_text("SUCCEEDED")
        await expect(feed(page, key, EventType.RELEASED)).to_have_count(1)


async def test_a_storm_of_100_duplicates_counts_100_and_the_feed_names_the_winner(
    guarded: SidecarProcess, dashboard: DashboardProcess, open_page: OpenPage, key: str
) -> None:
    page = await live_page(open_page, dashboard)
    async with AsyncClient(guarded.address) as client:
        winner = await client.acquire(key, holder="winner-host", ttl=300)
        await expect(row(page, key)).to_be_visible()
        refused = await asyncio.gather(
            *(client.acquire(key, run_id=f"dup-run-{i}", holder=f"dup-{i}", on_conflict="return") for i in range(100))
        )
    assert all(isinstance(answer, Conflict) for answer in refused)
    await expect(row(page, key).locator("td.c-dups")).to_have_attribute("data-run", "100")
    refusals = feed(page, key, EventType.DUPLICATE_REFUSED)
    await expect(refusals).to_have_count(100)
    await expect(refusals.filter(has_text="refused run dup-run-42 (dup-42); winner run ")).to_have_count(1)
    await expect(refusals.filter(has_text=f"winner run {winner.run_id[:8]}… (winner-host)")).to_have_count(100)
    winners = await refusals.evaluate_all("items => items.map(item => item.dataset.runId)")
    refused_runs = await refusals.evaluate_all("items => items.map(item => item.dataset.triggerRunId)")
    assert set(winners) == {winner.run_id}
    assert sorted(refused_runs) == sorted(f"dup-run-{i}" for i in range(100))


async def test_a_failed_guard_awaits_approval_and_the_page_approves_it_with_the_operator_token(
    guarded: SidecarProcess, dashboard: DashboardProcess, open_page: OpenPage, key: str
) -> None:
    page = await live_page(open_page, dashboard)
    async with AsyncClient(guarded.address) as client:
        failed = await failed_guard(client, key)
        failed_row = row(page, key)
        await expect(failed_row).to_have_class(re.compile(r"\bawaiting\b"))
        await expect(failed_row.locator("td.state")).to_contain_text("awaiting approval")
        await expect(page.locator("#counts .c-awaiting")).to_have_attribute("data-count", "1")

        await failed_row.click()
        await expect(page.locator("#detail-key")).to_have_text(key)
        approve = page.locator("#approve")
        await expect(approve).to_be_disabled()
        await page.fill("#token", OPERATOR_TOKEN)
        await page.fill("#operator", "alice")
        await page.click("#use-token")
        await expect(page.locator("#token")).to_have_value("")
        await expect(approve).to_be_enabled()
        await approve.click()
        await page.fill("#reason", "disk replaced")
        await page.click("#reason-ok")

        result = page.locator("#action-result")
        await expect(result).to_have_attribute("data-outcome", "ok")
        await expect(result).to_contain_text(f"approve-retry {key}: RETRY_APPROVED by alice")
        await expect(failed_row).to_have_attribute("data-state", "RETRY_APPROVED")
        await expect(failed_row).not_to_have_class(re.compile(r"\bawaiting\b"))
        await expect(page.locator("#history li[data-type='RETRY_APPROVED']")).to_contain_text("alice: disk replaced")

        retry = await client.acquire(key, holder="worker-2")
        assert retry.run_id != failed.run_id
        assert (retry.guard.approved_by, retry.guard.approval_reason) == ("alice", "disk replaced")
        await expect(failed_row).to_have_attribute("data-state", "RUNNING")

        # The same token ends the retry from the page.
        await page.click("#force")
        await page.fill("#reason", "host lost")
        await page.press("#reason", "Enter")
        await expect(result).to_contain_text(f"force-release {key}: CANCELLED by alice")
        assert (await client.get(key)).state is GuardState.CANCELLED
    assert OPERATOR_TOKEN not in page.url


async def test_without_the_token_the_buttons_are_disabled_and_a_forged_request_is_refused(
    guarded: SidecarProcess, dashboard: DashboardProcess, open_page: OpenPage, key: str
) -> None:
    page = await live_page(open_page, dashboard)
    async with AsyncClient(guarded.address) as client:
        await failed_guard(client, key)
        running = f"{key}-running"
        await client.acquire(running, ttl=300)
        await row(page, key).click()
        await expect(page.locator("#approve")).to_be_disabled()
        await expect(page.locator("#force")).to_be_disabled()
        await row(page, running).click()
        await expect(page.locator("#force")).to_be_disabled()

        body = {"task_key": key, "reason": "forged", "operator": "mallory"}
        viewer = dashboard.viewer(**ACTION_HEADERS)
        async with aiohttp.ClientSession() as http:
            # Our uid is an operator's on the sidecar's socket; the dashboard waives that, so only a token counts.
            for headers in (viewer, {**viewer, "X-TaskGuard-Operator-Token": "not-the-token"}):
                async with http.post(dashboard.url + "api/approve-retry", json=body, headers=headers) as response:
                    answer = await response.json()
                assert response.status == 403, answer
                assert answer == {"ok": False, "code": "PERMISSION_DENIED", "error": "operator token not accepted"}
            # The operator token alone does not let a request in: reading (and acting) needs the viewer token.
            operator_only = {**ACTION_HEADERS, "X-TaskGuard-Operator-Token": OPERATOR_TOKEN}
            async with http.post(dashboard.url + "api/approve-retry", json=body, headers=operator_only) as response:
                assert response.status == 401
                assert (await response.json())["code"] == "UNAUTHENTICATED"
            forced = {**body, "task_key": running}
            async with http.post(
                dashboard.url + "api/force-release", json=forced, headers=dashboard.viewer()
            ) as response:
                assert response.status == 403  # no X-TaskGuard-Dashboard header: refused before the sidecar
                assert (await response.json())["code"] == "CROSS_SITE"
            cross_site: list[dict[str, Any]] = [
                {"json": body, "headers": dashboard.viewer()},
                {"json": body, "headers": {**viewer, "Origin": "http://evil.example"}},
                {"json": body, "headers": {**viewer, "Sec-Fetch-Site": "cross-site"}},
                {"data": {"task_key": key, "reason": "form"}, "headers": viewer},
                {"json": body},  # cross-site and no token: the answer says cross-site, nothing about the token
            ]
            for request in cross_site:
                async with http.post(dashboard.url + "api/approve-retry", **request) as response:
                    assert response.status == 403, request
                    assert (await response.json())["code"] == "CROSS_SITE", request
            async with http.get(dashboard.url, headers={"Host": "rebound.example"}) as response:
                assert response.status == 421  # a DNS-rebound name does not get the page
            async with http.get(dashboard.url + "api/approve-retry", headers=dashboard.viewer()) as response:
                assert response.status == 405
        assert (await client.get(key)).state is GuardState.FAILED
        assert (await client.get(running)).state is GuardState.RUNNING


@pytest.mark.slow
async def test_the_page_shows_a_sidecar_outage_and_catches_up_without_gaps_or_repeats(
    sidecar_factory: Callable[..., SidecarProcess],
    guarded: SidecarProcess,
    dashboard: DashboardProcess,
    open_page: OpenPage,
    token_file: Path,
    workdir: Path,
    key: str,
) -> None:
    page = await live_page(open_page, dashboard)
    banner = page.locator("#banner")
    async with AsyncClient(guarded.address) as client:
        first = await client.acquire(f"{key}/0", ttl=600)
        await client.acquire(f"{key}/1", ttl=600, holder="winner")
        await expect(feed(page, f"{key}/1", EventType.ACQUIRED)).to_have_count(1)

    await asyncio.to_thread(guarded.kill)
    await expect(banner).to_be_visible()
    await expect(banner).to_have_attribute("data-kind", "sidecar")
    await expect(banner).to_contain_text("unreachable")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "down")

    # Meanwhile the same database is served where the dashboard is not looking: these events are only in the log.
    elsewhere = await asyncio.to_thread(
        sidecar_factory, "--operator-token-file", str(token_file), "--listen", f"unix:{workdir / 'other.sock'}"
    )
    async with AsyncClient(elsewhere.address) as client:
        await client.release(first.lease_id, RunStatus.FAILED, "crashed")
        for i in range(3):
            await client.acquire(f"{key}/1", holder=f"dup-{i}", on_conflict="return")
        await client.acquire(f"{key}/2", ttl=600)
    assert await asyncio.to_thread(elsewhere.terminate) == 0
    await expect(banner).to_be_visible()

    await asyncio.to_thread(guarded.start)
    await expect(banner).to_be_hidden()
    await expect(page.locator("#connection")).to_have_attribute("data-state", "up")
    async with AsyncClient(guarded.address) as client:
        last = await client.acquire(f"{key}/3", ttl=600)
        await expect(feed(page, f"{key}/3", EventType.ACQUIRED)).to_have_count(1)
        in_log = await logged(client, key, last.guard.revision)
    await expect(row(page, f"{key}/0")).to_have_attribute("data-state", "FAILED")
    await expect(row(page, f"{key}/1").locator("td.c-dups")).to_have_attribute("data-run", "3")
    shown = [revision for revision in await revisions(page, "#feed") if revision <= last.guard.revision]
    assert len(in_log) == 8  # acquire, acquire, release, 3 refusals, acquire, acquire
    assert shown == in_log, f"page {shown} != sidecar's log {in_log}"


async def test_the_page_waits_for_a_sidecar_that_is_not_there_yet(
    sidecar_factory: Callable[..., SidecarProcess],
    token_file: Path,
    dashboards: Dashboards,
    open_page: OpenPage,
    key: str,
) -> None:
    sidecar = sidecar_factory("--operator-token-file", str(token_file), start=False)
    dashboard = await dashboards.start(sidecar.address)
    page = await open_page(dashboard.url)
    await unlock(page, dashboard)
    await expect(page.locator("#banner")).to_have_attribute("data-kind", "sidecar")
    await expect(page.locator("#banner")).to_be_visible()
    await asyncio.to_thread(sidecar.start)
    await expect(page.locator("#banner")).to_be_hidden()
    async with AsyncClient(sidecar.address) as client:
        await client.acquire(key)
    await expect(row(page, key)).to_be_visible()


def test_the_dashboard_refuses_to_listen_beyond_loopback_unless_allowed(workdir: Path) -> None:
    import subprocess

    command = [sys.executable, "-m", "taskguard", "dashboard", "--addr", f"unix:{workdir}/none.sock"]
    refused = subprocess.run([*command, "--listen", "0.0.0.0:0"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert refused.returncode == 2
    assert "--allow-remote" in refused.stderr and "Traceback" not in refused.stderr


# --- the viewer token ------------------------------------------------------------------------------


async def test_without_the_viewer_token_the_page_shows_nothing_and_a_wrong_one_is_refused(
    guarded: SidecarProcess, dashboard: DashboardProcess, open_page: OpenPage, key: str
) -> None:
    async with AsyncClient(guarded.address) as client:
        await client.acquire(key, holder="secret-holder", ttl=300)
    page = await open_page(dashboard.url)
    await expect(page.locator("#locked")).to_be_visible()
    await expect(page.locator("#connection")).to_have_attribute("data-state", "locked")
    assert await page.locator("tr.row").count() == 0
    assert "secret-holder" not in await page.content()

    await page.fill("#viewer-token", "not-the-viewer-token")
    await page.press("#viewer-token", "Enter")
    await expect(page.locator("#locked-error")).to_contain_text("refused")
    await expect(page.locator("#locked")).to_be_visible()
    assert await page.locator("tr.row").count() == 0
    assert await page.evaluate("() => sessionStorage.getItem('taskguard.viewerToken')") is None

    await unlock(page, dashboard)
    await expect(row(page, key).locator("td.c-holder")).to_have_text("secret-holder")
    # A reload in the same tab keeps the token (sessionStorage), and it is in no URL the page used.
    await page.reload()
    await expect(row(page, key)).to_be_visible()
    assert dashboard.viewer_token not in page.url


async def test_the_page_rides_out_a_dashboard_restart_and_a_new_token_locks_it_again(
    guarded: SidecarProcess, dashboards: Dashboards, open_page: OpenPage, key: str
) -> None:
    first = await dashboards.start(guarded.address)
    page = await live_page(open_page, first)
    assert await first.stop() == 0
    await expect(page.locator("#banner")).to_have_attribute("data-kind", "dashboard")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "dashboard-down")

    # The same port and token file: the page reconnects by itself, with the token it has.
    listen = first.url.removeprefix("http://").rstrip("/")
    second = await dashboards.start(guarded.address, listen=listen, token_path=first.viewer_token_path)
    await expect(page.locator("#connection")).to_have_attribute("data-state", "up")
    await expect(page.locator("#banner")).to_be_hidden()
    async with AsyncClient(guarded.address) as client:
        await client.acquire(key, ttl=300)
    await expect(row(page, key)).to_be_visible()

    # Another token (its file replaced): the page's token no longer opens anything, and it asks again.
    assert await second.stop() == 0
    first.viewer_token_path.unlink()
    third = await dashboards.start(guarded.address, listen=listen, token_path=first.viewer_token_path)
    await expect(page.locator("#locked")).to_be_visible()
    await expect(page.locator("#locked-error")).to_contain_text("refused")
    await unlock(page, third)
    await expect(row(page, key)).to_be_visible()


async def test_a_server_squatting_the_port_while_the_dashboard_is_down_gets_no_token_from_an_open_page(
    guarded: SidecarProcess, dashboards: Dashboards, open_page: OpenPage
) -> None:
    dashboard = await dashboards.start(guarded.address)
    page = await live_page(open_page, dashboard)
    await page.fill("#token", OPERATOR_TOKEN)
    await page.click("#use-token")
    assert await dashboard.stop() == 0

    # Another local user binds the free port: it answers everything, and keeps every request it is sent.
    seen: list[str] = []
    asked = asyncio.Event()

    async def anything(request: web.Request) -> web.StreamResponse:
        seen.append(f"{request.method} {request.path_qs} {dict(request.headers)}")
        asked.set()
        if request.path == "/proof":
            return web.json_response({"proof": "0" * 64})  # it cannot know the token: a guess
        return web.Response(status=200, text="event: hello\ndata: {}\n\n", content_type="text/event-stream")

    squatter = web.Application()
    squatter.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(squatter, access_log=None)
    await runner.setup()
    host, port = dashboard.url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    try:
        await web.TCPSite(runner, host, int(port)).start()
        await asyncio.wait_for(asked.wait(), START_TIMEOUT_S)  # the page reconnects by itself
        await expect(page.locator("#locked")).to_be_visible()
        await expect(page.locator("#locked-error")).to_contain_text("sent it nothing")
        # Actions and history need a proven server too: nothing goes out with the operator token either.
        assert all(not line.startswith("GET /events") for line in seen), seen
    finally:
        await runner.cleanup()
    assert seen, "the page never asked"
    for line in seen:
        assert dashboard.viewer_token not in line and OPERATOR_TOKEN not in line, line


# Run as another OS user with the system's Python (no access to our venv): every data route of the dashboard
# without the viewer token, then with the token (read from stdin, as if the user had been given it).
_OTHER_USER_PROBE = r"""
import http.client, json, sys, urllib.parse

port, key = int(sys.argv[1]), sys.argv[2]
found = {}

def ask(method, path, headers=(), body=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    connection.request(method, path, body=body, headers=dict(headers))
    response = connection.getresponse()
    if response.getheader("Content-Type", "").startswith("text/event-stream"):
        text = b""
        while b"event: hello" not in text or not text.endswith(b"\n\n"):
            text += response.read1(65536)
        connection.close()
        return response.status, text.decode()
    text = response.read().decode()
    connection.close()
    return response.status, text

action = {"X-TaskGuard-Dashboard": "1", "Content-Type": "application/json"}
body = json.dumps({"task_key": key, "reason": "from another user", "operator": "nobody"})
history = "/api/history?task_key=" + urllib.parse.quote(key)
for name, token in (("none", None), ("wrong", "Bearer not-the-viewer-token")):
    auth = {"Authorization": token} if token else {}
    found[name] = {
        "events": ask("GET", "/events", auth),
        "history": ask("GET", history, auth),
        "approve": ask("POST", "/api/approve-retry", {**auth, **action}, body),
    }
try:
    open(sys.argv[3]).read()
    found["token_file"] = "readable"
except OSError as error:
    found["token_file"] = type(error).__name__
viewer_token, operator_token = sys.stdin.read().split()
auth = {"Authorization": "Bearer " + viewer_token}
operator = {"X-TaskGuard-Operator-Token": operator_token}
found["with"] = {
    "events": ask("GET", "/events", auth),
    "history": ask("GET", history, auth),
    "approve": ask("POST", "/api/approve-retry", {**auth, **action, **operator}, body),
}
print(json.dumps(found))
"""


def _as_nobody(*command: str) -> list[str]:
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command]


async def test_another_os_user_reads_nothing_without_the_viewer_token_and_everything_with_it(
    guarded: SidecarProcess, dashboard: DashboardProcess, key: str
) -> None:
    async with AsyncClient(guarded.address) as client:
        await failed_guard(client, key)
        await expect_guard_seen(dashboard, key)
    port = dashboard.url.rstrip("/").rsplit(":", 1)[1]
    probe = await asyncio.create_subprocess_exec(
        *_as_nobody("/usr/bin/python3", "-c", _OTHER_USER_PROBE, port, key, str(dashboard.viewer_token_path)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd="/",
    )
    tokens = f"{dashboard.viewer_token} {OPERATOR_TOKEN}\n".encode()
    out, err = await asyncio.wait_for(probe.communicate(tokens), START_TIMEOUT_S * 3)
    assert probe.returncode == 0, err.decode()
    found = json.loads(out)

    for attempt in ("none", "wrong"):
        for route, (status, text) in found[attempt].items():
            assert status == 401, (attempt, route, status, text)
            assert key not in text and "worker-1" not in text, (attempt, route, text)
            assert json.loads(text)["code"] == "UNAUTHENTICATED"
    assert found["token_file"] == "PermissionError"

    status, text = found["with"]["events"]
    assert status == 200 and key in text and "worker-1" in text
    status, text = found["with"]["history"]
    assert status == 200 and json.loads(text)["guard"]["holder"] == "worker-1"
    status, text = found["with"]["approve"]
    assert status == 200 and json.loads(text)["guard"]["state"] == "RETRY_APPROVED", text
    async with AsyncClient(guarded.address) as client:
        guard = await client.get(key)
    assert (guard.state, guard.approved_by) == (GuardState.RETRY_APPROVED, "nobody")


async def expect_guard_seen(dashboard: DashboardProcess, key: str) -> None:
    """Wait until the dashboard has ``key`` (it follows the sidecar's watch): read its event stream until it
    names the key, in the hello or in a batch after it."""

    async def seen() -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.get(dashboard.url + "events", headers=dashboard.viewer()) as response,
        ):
            assert response.status == 200
            text = ""
            async for chunk in response.content.iter_any():
                text += chunk.decode()
                if key in text:
                    return

    await asyncio.wait_for(seen(), START_TIMEOUT_S)


@pytest.mark.parametrize("problem", ["readable-by-others", "another-users", "a-symlink", "too-short"])
def test_the_dashboard_refuses_a_viewer_token_file_others_could_read_or_swap(workdir: Path, problem: str) -> None:
    import os
    import subprocess

    path = workdir / "viewer.token"
    secret = "s3cret-viewer-token-" + problem
    if problem == "a-symlink":
        target = workdir / "elsewhere.token"
        target.write_text(secret)
        target.chmod(0o600)
        path.symlink_to(target)
    else:
        path.write_text("short" if problem == "too-short" else secret)
        path.chmod(0o644 if problem == "readable-by-others" else 0o600)
        if problem == "another-users":
            os.chown(path, 65534, 65534)  # nobody's
    command = [sys.executable, "-m", "taskguard", "dashboard", "--addr", f"unix:{workdir}/none.sock"]
    refused = subprocess.run(
        [*command, "--listen", "127.0.0.1:0", "--viewer-token-file", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert refused.returncode == 2, refused
    assert f"viewer token file {path}" in refused.stderr and "Traceback" not in refused.stderr
    assert secret not in refused.stderr + refused.stdout


# --- 10,000 guards -------------------------------------------------------------------------------


GUARDS = 10_000
SESSIONS = 100


def _ten_thousand_keys(prefix: str) -> Iterator[str]:
    for i in range(GUARDS):
        yield f"{prefix}-{i % SESSIONS:02d}::task-{i:05d}"


async def _acquire_many(client: AsyncClient, keys: list[str], concurrency: int = 64) -> list[Lease]:
    gate = asyncio.Semaphore(concurrency)

    async def one(task_key: str) -> Lease:
        async with gate:
            return await client.acquire(task_key, ttl=3600, holder=f"worker-{task_key.split('::')[0]}")

    return await asyncio.gather(*(one(task_key) for task_key in keys))


async def _metrics(page: Page) -> dict[str, Any]:
    figures: dict[str, Any] = await page.evaluate("() => ({...window.taskguardDashboard.metrics})")
    return figures


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_ten_thousand_guards_load_and_filter_without_freezing(
    sidecar_factory: Callable[..., SidecarProcess], token_file: Path, dashboards: Dashboards, open_page: OpenPage
) -> None:
    # One caller holds them all here, and the sidecar caps the guards one caller may run.
    guarded = sidecar_factory("--operator-token-file", str(token_file), "--max-guards-per-holder", str(2 * GUARDS))
    prefix = "load"
    keys = list(_ten_thousand_keys(prefix))
    async with AsyncClient(guarded.address) as client:
        started = time.monotonic()
        leases = await _acquire_many(client, keys)
        for lease in leases[::100]:
            await client.release(lease.lease_id, RunStatus.FAILED, "exit code 1")
        print(f"\ndashboard 10k: {GUARDS} guards acquired in {time.monotonic() - started:.1f} s")

        dashboard = await dashboards.start(guarded.address)
        opened = time.monotonic()
        page = await open_page(dashboard.url)
        await unlock(page, dashboard)
        shown = page.locator("#shown")
        await expect(shown).to_have_attribute("data-total", str(GUARDS), timeout=60_000)
        cold_s = time.monotonic() - opened

        # A page opened once the dashboard has them all: the figure an operator sees.
        opened = time.monotonic()
        await page.reload()
        await expect(shown).to_have_attribute("data-total", str(GUARDS))
        await expect(page.locator("tr.row").first).to_be_visible()
        warm_s = time.monotonic() - opened
        loaded = await _metrics(page)
        rows_in_dom = await page.locator("tr.row").count()
        assert loaded["helloGuards"] == GUARDS
        assert rows_in_dom < 200, "the table is not virtualised"

        timings = []
        for value, expected in ((f"{prefix}-42::", 100), (f"{prefix}-42::task-00042", 1), ("", GUARDS)):
            begun = time.monotonic()
            await page.fill("#filter-prefix", value)
            await expect(shown).to_have_attribute("data-shown", str(expected))
            timings.append(
                (value or "(none)", 1000 * (time.monotonic() - begun), (await _metrics(page))["lastFilterMs"])
            )
        begun = time.monotonic()
        await page.select_option("#filter-state", "awaiting")
        await expect(shown).to_have_attribute("data-shown", str(GUARDS // 100))
        timings.append(("awaiting approval", 1000 * (time.monotonic() - begun), (await _metrics(page))["lastFilterMs"]))
        await page.select_option("#filter-state", "")

        # The last row is reachable by scrolling: the virtual table renders what is in view.
        await page.eval_on_selector("#grid", "grid => { grid.scrollTop = grid.scrollHeight; }")
        await expect(row(page, max(keys))).to_be_visible()

        # Live events keep flowing into a loaded page: 500 refusals on one key, as fast as the sidecar takes them.
        target = keys[4242]
        await page.fill("#filter-prefix", target)
        begun = time.monotonic()
        await asyncio.gather(*(client.acquire(target, holder=f"dup-{i}", on_conflict="return") for i in range(500)))
        await expect(row(page, target).locator("td.c-dups")).to_have_attribute("data-run", "500")
        storm_s = time.monotonic() - begun
        final = await _metrics(page)

    print(
        f"dashboard 10k: cold page (dashboard reading its snapshot too) {cold_s * 1000:.0f} ms to all {GUARDS};"
        f" warm page: hello at {loaded['helloMs']} ms, first render at {loaded['firstRenderMs']} ms after navigation,"
        f" {warm_s * 1000:.0f} ms wall; {rows_in_dom} rows in the DOM"
    )
    for name, wall_ms, render_ms in timings:
        print(f"dashboard 10k: filter {name!r}: {render_ms:.1f} ms in the page, {wall_ms:.0f} ms wall")
    print(
        f"dashboard 10k: 500 refusals sent and shown in {storm_s * 1000:.0f} ms;"
        f" longest task in the page {final['longestTaskMs']:.0f} ms; {final['batches']} batches"
    )
    assert loaded["firstRenderMs"] < 10_000
    assert all(render_ms < 2_000 for _, _, render_ms in timings)


# --- the page as operators use it: laptop screens, keyboards, one time zone, outages, storms ----------------------


# ABANDONED and EXPIRED guards wait for approval too: that makes the widest state cell there is.
SEEDED_SIDECAR_ARGS = ("--abandoned-requires-approval", "--expired-requires-approval")


@dataclass
class Seeded:
    """Guards in every state worth seeing (``seed``)."""

    keys: list[str]
    stormed: str  # RUNNING; ``storm`` refuses acquisitions of it
    failed: str  # FAILED, a retry refused: awaiting approval
    abandoned: str  # ABANDONED, a retry refused: awaiting approval and stale, the widest state cell
    expired: str  # EXPIRED: stale


async def abandon(address: str, task_key: str, holder: str) -> int:
    """A Hold stream that acquires ``task_key`` and drops: the sidecar ends its run ABANDONED. Its revision."""
    async with aio.insecure_channel(address) as channel:
        call = pb_grpc.TaskGuardStub(channel).Hold()
        await call.write(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=task_key, holder=holder)))
        first = await asyncio.wait_for(call.read(), START_TIMEOUT_S)
        call.cancel()
    revision: int = first.guard.revision
    return revision


async def seed(client: AsyncClient, address: str) -> Seeded:
    """What an operator's screen looks like on a normal day, with a bit of trouble (needs ``SEEDED_SIDECAR_ARGS``)."""
    keys = []

    async def run(task_key: str, holder: str, ttl: float = 900) -> Lease:
        keys.append(task_key)
        return await client.acquire(task_key, holder=holder, ttl=ttl)

    report = await run("billing-7f2a::nightly-report", "worker-a:4121")
    await run("billing-7f2a::email-digest", "worker-b:977")
    await run("billing-7f2a::invoice-pdf", "worker-b:978")
    await run("search-19c4::reindex-shard-3", "indexer-2:31")
    await run("search-19c4::reindex-shard-4", "indexer-3:17")
    done = await run("search-19c4::warm-cache", "cron:88")
    await client.release(done.lease_id, RunStatus.SUCCEEDED)
    failed = await run("ml-team-03::train-ranker", "gpu-1:7712")
    await client.release(failed.lease_id, RunStatus.FAILED, "exit code 137 (out of memory)")
    await client.acquire(failed.task_key, holder="scheduler:42", on_conflict="return")
    await run("ml-team-03::eval-suite", "gpu-2:310")
    expired = await run("ops-0a1b::rotate-logs", "cron:91", ttl=1)
    held = await run("ops-0a1b::backup-db", "backup-1:220")
    await client.release(held.lease_id, RunStatus.CANCELLED, "operator stopped it")
    await client.acquire(held.task_key, holder="backup-1:221", ttl=900)
    for task in ("sync-crm", "export-csv"):
        lease = await run(f"sales-44d0::{task}", "worker-f:12")
        await client.release(lease.lease_id, RunStatus.SUCCEEDED)
    abandoned = "search-19c4::reindex-shard-5"
    keys.append(abandoned)
    held_at = await abandon(address, abandoned, "indexer-4:23")
    await next_event(client, abandoned, EventType.ABANDONED, held_at)
    await client.acquire(abandoned, holder="indexer-4:24", on_conflict="return")
    await next_event(client, expired.task_key, EventType.EXPIRED, expired.guard.revision)
    return Seeded(sorted(set(keys)), report.task_key, failed.task_key, abandoned, expired.task_key)


async def storm(client: AsyncClient, task_key: str, count: int) -> None:
    """``count`` acquisitions of a running key, all at once, from other hosts: each one refused."""
    answers = await asyncio.gather(
        *(
            client.acquire(task_key, holder=f"worker-{'cde'[i % 3]}:{5000 + i}", on_conflict="return")
            for i in range(count)
        )
    )
    assert all(isinstance(answer, Conflict) for answer in answers)


# For every row in the table: the essential cells (key, state with its badges, holder, age, expires, dups) and
# every visible heading, whether their content is wider than the room they have, and whether a badge pokes out.
_CUT_OFF = """() => {
  const cut = [];
  const check = (element, what) => {
    if (element.scrollWidth > element.clientWidth + 0.5) {
      cut.push(`${what} "${element.textContent}": ${element.scrollWidth} px in ${element.clientWidth}`);
    }
  };
  for (const heading of document.querySelectorAll("#guards thead th")) {
    if (heading.offsetWidth > 0) check(heading, "heading");
  }
  for (const row of document.querySelectorAll("tr.row")) {
    for (const name of ["c-key", "c-state", "c-holder", "c-age", "c-expires", "c-dups"]) {
      check(row.querySelector("td." + name), `${name} of ${row.dataset.taskKey}`);
    }
    const cell = row.querySelector("td.c-state").getBoundingClientRect();
    for (const badge of row.querySelectorAll("td.c-state .tag")) {
      const box = badge.getBoundingClientRect();
      if (box.right > cell.right - 1 || box.left < cell.left || box.bottom > cell.bottom) {
        cut.push(`badge "${badge.textContent}" of ${row.dataset.taskKey} outside its cell`);
      }
    }
  }
  return cut;
}"""


async def box(page: Page, selector: str) -> dict[str, float]:
    found = await page.locator(selector).bounding_box()
    assert found is not None, f"{selector} is not shown"
    return dict(found)


@BOTH_SIZES
async def test_on_a_laptop_and_a_desktop_screen_key_state_badges_holder_age_and_dups_show_uncut(
    sidecar_factory: Callable[..., SidecarProcess],
    token_file: Path,
    dashboards: Dashboards,
    open_page: OpenPage,
    viewport: tuple[int, int],
) -> None:
    sidecar = sidecar_factory("--operator-token-file", str(token_file), *SEEDED_SIDECAR_ARGS)
    dashboard = await dashboards.start(sidecar.address)
    async with AsyncClient(sidecar.address) as client:
        seeded = await seed(client, sidecar.address)
        await storm(client, seeded.stormed, 12)
        stormed = await client.get(seeded.stormed)
    page = await live_page(open_page, dashboard)
    await expect(page.locator("tr.row")).to_have_count(len(seeded.keys))
    state = row(page, seeded.abandoned).locator("td.c-state")
    await expect(state).to_have_text("ABANDONED, awaiting approval, stale")
    await expect(state.locator(".tag")).to_have_count(2)
    await expect(row(page, seeded.stormed).locator("td.c-dups")).to_have_attribute("data-run", "12")

    cut = await page.evaluate(_CUT_OFF)
    assert cut == [], f"cut off at {viewport}: {cut}"
    wide = viewport[0] >= 1600
    # What does not fit a laptop: run id, started and token join on a wide screen, and are always on hover.
    assert await page.locator("th.opt").first.is_visible() == wide
    key_title = await row(page, seeded.stormed).locator("td.c-key").get_attribute("title") or ""
    assert stormed.run_id in key_title and "started" in key_title
    assert f"fencing token {stormed.fencing_token}" in key_title
    await row(page, seeded.stormed).click()
    await expect(page.locator("#detail-fields")).to_contain_text(stormed.run_id)
    await expect(page.locator("#detail-fields")).to_contain_text(f"fencing token {stormed.fencing_token}")

    # The side pane sits beside the table, and gives way to it when hidden.
    guards, side = await box(page, "section.guards"), await box(page, "#side")
    assert side["x"] >= guards["x"] + guards["width"] - 1 and side["width"] <= viewport[0] * 0.3, (guards, side)
    toggle = page.locator("#side-toggle")
    await toggle.click()
    await expect(toggle).to_have_attribute("aria-expanded", "false")
    await expect(page.locator("#side")).to_be_hidden()
    await expect(page.locator("th.opt").first).to_be_visible()
    assert (await box(page, "section.guards"))["width"] >= viewport[0] - 2
    assert await page.evaluate(_CUT_OFF) == []
    await toggle.click()
    await expect(page.locator("#side")).to_be_visible()

    # A narrow window: the side pane moves below the table.
    await page.set_viewport_size({"width": 900, "height": viewport[1]})
    guards, side = await box(page, "section.guards"), await box(page, "#side")
    assert side["y"] >= guards["y"] + guards["height"] - 1 and side["width"] >= 850, (guards, side)


async def rendered(page: Page) -> None:
    """Make the page render its table (as a scroll does), and wait until it has."""
    await page.evaluate(
        """() => new Promise(done => {
          document.getElementById("grid").dispatchEvent(new Event("scroll"));
          requestAnimationFrame(() => requestAnimationFrame(done));
        })"""
    )


def _utc(at: datetime) -> str:
    """A time as the page's hover gives it: UTC, to the millisecond."""
    return f"{at:%Y-%m-%d %H:%M:%S}.{at.microsecond // 1000:03d} UTC"


@BOTH_SIZES
async def test_every_time_on_the_page_is_local_with_its_zone_shown_and_utc_on_hover(
    guarded: SidecarProcess, dashboard: DashboardProcess, open_page: OpenPage, key: str
) -> None:
    zone, offset = ZoneInfo("Asia/Kolkata"), "UTC+5:30"  # half an hour off, and no daylight saving
    page = await live_page(open_page, dashboard, timezone_id="Asia/Kolkata")
    await expect(page.locator("#zone")).to_have_attribute("data-zone", offset)
    await expect(page.locator("#zone")).to_contain_text(re.compile(r"\(Asia/(Kolkata|Calcutta)\)"))  # ICU's old name
    async with AsyncClient(guarded.address) as client:
        lease = await client.acquire(key, holder="worker-1", ttl=300)
    assert lease.guard.started_at is not None
    started = lease.guard.started_at
    local = started.astimezone(zone)

    started_cell = row(page, key).locator("td.c-started")
    await expect(started_cell).to_have_text(f"{local:%H:%M:%S}")
    await expect(started_cell).to_have_attribute("title", _utc(started))
    await expect(page.locator("#started-head")).to_have_text(f"started ({offset})")
    when = feed(page, key, EventType.ACQUIRED).locator(".when")
    await expect(when).to_have_text(f"{local:%H:%M:%S}")
    await expect(when).to_have_attribute("title", _utc(started))
    await expect(page.locator("#feed-title")).to_contain_text(offset)

    await row(page, key).click()
    detail = page.locator('#detail-fields dd[data-time="started"]')
    await expect(detail).to_have_text(f"{local:%Y-%m-%d %H:%M:%S} {offset}")
    await expect(detail).to_have_attribute("title", _utc(started))
    expires = page.locator('#detail-fields dd[data-time="expires"]')
    assert lease.guard.expires_at is not None
    await expect(expires).to_have_text(f"{lease.guard.expires_at.astimezone(zone):%Y-%m-%d %H:%M:%S} {offset}")
    shown = await page.locator("body").inner_text()
    assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", shown), "an ISO time (UTC) is shown as such"

    # The outage's times too.
    await asyncio.to_thread(guarded.kill)
    await expect(page.locator("#banner")).to_contain_text(offset)
    await expect(page.locator("#last-known")).to_contain_text(offset)
    await asyncio.to_thread(guarded.start)
    await expect(page.locator("#connection")).to_have_attribute("data-state", "up")


async def use_operator_token(page: Page, token: str = OPERATOR_TOKEN, name: str = "alice") -> None:
    await page.fill("#token", token)
    await page.fill("#operator", name)
    await page.click("#use-token")


async def focused(page: Page) -> str:
    found: str = await page.evaluate("() => document.activeElement && document.activeElement.id")
    return found


@BOTH_SIZES
async def test_the_keyboard_chooses_a_guard_opens_it_and_reaches_its_labelled_actions(
    guarded: SidecarProcess, dashboard: DashboardProcess, open_page: OpenPage, key: str
) -> None:
    first, second, third = f"{key}/a", f"{key}/b", f"{key}/c"
    async with AsyncClient(guarded.address) as client:
        await client.acquire(first, ttl=600)
        await failed_guard(client, second)
        await client.acquire(third, ttl=600)
    page = await live_page(open_page, dashboard)
    await use_operator_token(page)
    await expect(page.locator("#token-state")).to_have_attribute("data-state", "accepted")
    await page.fill("#filter-prefix", key)
    await expect(page.locator("tr.row")).to_have_count(3)

    # Tab reaches the table.
    for _ in range(30):
        if await focused(page) == "guards":
            break
        await page.keyboard.press("Tab")
    assert await focused(page) == "guards"
    grid = page.locator("#guards")
    await expect(grid).to_have_attribute("role", "grid")

    async def chosen(task_key: str) -> None:
        chosen_row = row(page, task_key)
        await expect(chosen_row).to_have_attribute("aria-selected", "true")
        await expect(page.locator("#detail-key")).to_have_text(task_key)
        row_id = await chosen_row.get_attribute("id")
        await expect(grid).to_have_attribute("aria-activedescendant", row_id or "?")
        await expect(page.locator('tr.row[aria-selected="true"]')).to_have_count(1)

    for press, task_key in (
        ("ArrowDown", first),
        ("ArrowDown", second),
        ("ArrowDown", third),
        ("ArrowDown", third),
        ("ArrowUp", second),
        ("Home", first),
        ("End", third),
        ("PageUp", first),
        ("ArrowDown", second),
    ):
        await page.keyboard.press(press)
        await chosen(task_key)

    # What a screen reader reads: the state cell as words, the table's cells by their content.
    await expect(page.get_by_role("gridcell", name="FAILED, awaiting approval", exact=True)).to_have_count(1)
    await expect(row(page, second).locator("td.c-dups")).to_have_accessible_name(re.compile(r"^0 refused in this run"))

    # Enter opens it: the pane has the focus, its actions are the next stops, named for the key.
    await page.keyboard.press("Enter")
    assert await focused(page) == "detail-title"
    await expect(page.locator("#history li.event")).to_have_count(2)
    await page.keyboard.press("Tab")
    assert await focused(page) == "approve"
    approve = page.locator("#approve")
    await expect(approve).to_have_accessible_name(f"Approve retry of {second}")
    await expect(approve).to_be_enabled()
    await expect(approve).to_have_accessible_description("Let this key be acquired once more.")
    await page.keyboard.press("Tab")
    assert await focused(page) == "force"
    force = page.locator("#force")
    await expect(force).to_have_accessible_name(f"Force release of {second}")
    await expect(force).to_be_disabled()
    await expect(force).to_have_accessible_description(re.compile("Only a RUNNING guard can be force-released"))
    await page.keyboard.press("Enter")  # disabled: nothing opens
    await expect(page.locator("#reason-dialog")).not_to_have_attribute("open", "")

    await page.keyboard.press("Shift+Tab")
    await page.keyboard.press("Enter")
    await expect(page.locator("#reason-dialog")).to_have_attribute("open", "")
    assert await focused(page) == "reason"
    await page.keyboard.type("disk replaced")
    await page.keyboard.press("Enter")
    await expect(page.locator("#action-result")).to_contain_text(f"approve-retry {second}: RETRY_APPROVED by alice")
    await expect(row(page, second)).to_have_attribute("data-state", "RETRY_APPROVED")

    # Escape goes back to the table, where the arrows carry on from the guard chosen.
    await page.keyboard.press("Escape")
    assert await focused(page) == "guards"
    await page.keyboard.press("ArrowDown")
    await chosen(third)


@BOTH_SIZES
async def test_while_the_sidecar_is_down_actions_are_off_the_table_is_last_known_and_its_clocks_stop(
    guarded: SidecarProcess, dashboard: DashboardProcess, open_page: OpenPage, key: str
) -> None:
    running, failed = f"{key}/running", f"{key}/failed"
    async with AsyncClient(guarded.address) as client:
        lease = await client.acquire(running, ttl=600)
        await failed_guard(client, failed)
    page = await live_page(open_page, dashboard, clock=True)
    await use_operator_token(page)
    await row(page, failed).click()
    approve, force = page.locator("#approve"), page.locator("#force")
    await expect(approve).to_be_enabled()
    age, expires = row(page, running).locator("td.c-age"), row(page, running).locator("td.c-expires")

    # Live, the clocks run: a minute later the age says so.
    await page.clock.fast_forward(61_000)
    await expect(age).to_have_text(re.compile(r"^1m\d+s$"))
    await expect(page.locator("#last-known")).to_be_hidden()

    await asyncio.to_thread(guarded.kill)
    await expect(page.locator("#connection")).to_have_attribute("data-state", "down")
    await expect(approve).to_be_disabled()
    await expect(page.locator("#action-why")).to_have_text(
        "Actions are off: the sidecar is unreachable.", use_inner_text=True
    )
    await expect(approve).to_have_accessible_description("Actions are off: the sidecar is unreachable.")
    await row(page, running).click()
    await expect(force).to_be_disabled()
    last_known = page.locator("#last-known")
    await expect(last_known).to_be_visible()
    await expect(last_known).to_contain_text("Last known state, as of")
    await expect(page.locator("#grid")).to_have_attribute("data-live", "false")
    as_of = datetime.fromisoformat((await last_known.get_attribute("data-as-of") or "").replace("Z", "+00:00"))
    assert lease.guard.started_at is not None
    seconds_then = int((as_of - lease.guard.started_at).total_seconds())
    await expect(age).to_have_text(f"{seconds_then}s" if seconds_then < 60 else re.compile(r"^\d+m\d+s$"))
    frozen_age, frozen_expires = await age.text_content(), await expires.text_content()

    # Three minutes on (past the 120 s stale_after): nothing moves, nothing turns stale.
    await page.clock.fast_forward(180_000)
    await rendered(page)
    assert (await age.text_content(), await expires.text_content()) == (frozen_age, frozen_expires)
    await expect(row(page, running)).not_to_have_class(re.compile(r"\bstale\b"))

    await asyncio.to_thread(guarded.start)
    await expect(page.locator("#connection")).to_have_attribute("data-state", "up")
    await expect(last_known).to_be_hidden()
    await expect(force).to_be_enabled()
    await expect(age).not_to_have_text(frozen_age or "")


@BOTH_SIZES
async def test_after_a_dashboard_restart_the_page_has_its_feed_and_open_history_again_from_the_sidecars_log(
    guarded: SidecarProcess, dashboards: Dashboards, open_page: OpenPage, key: str
) -> None:
    first = await dashboards.start(guarded.address)
    page = await live_page(open_page, first)
    chosen, other = f"{key}/chosen", f"{key}/other"
    async with AsyncClient(guarded.address) as client:
        lease = await client.acquire(chosen, holder="worker-1", ttl=600)
        await client.acquire(other, ttl=600)
        await storm(client, chosen, 3)
        await client.release(lease.lease_id, RunStatus.FAILED, "exit code 2")
        await expect(feed(page, chosen, EventType.RELEASED)).to_have_count(1)
        await use_operator_token(page)
        await row(page, chosen).click()
        await expect(page.locator("#history li.event")).to_have_count(5)
        feed_before, history_before = await revisions(page, "#feed"), await revisions(page, "#history")
        assert feed_before == await logged(client, key, feed_before[-1])

        assert await first.stop() == 0
        await expect(page.locator("#connection")).to_have_attribute("data-state", "dashboard-down")
        await expect(page.locator("#last-known")).to_contain_text("the dashboard is unreachable")
        await expect(page.locator("#approve")).to_be_disabled()

        listen = first.url.removeprefix("http://").rstrip("/")
        second = await dashboards.start(guarded.address, listen=listen, token_path=first.viewer_token_path)
        await expect(page.locator("#connection")).to_have_attribute("data-state", "up")
        await expect(page.locator("#feed li.event")).to_have_count(len(feed_before))
        assert await revisions(page, "#feed") == feed_before
        await expect(page.locator("#history li.event")).to_have_count(len(history_before))
        assert await revisions(page, "#history") == history_before
        await expect(page.locator("#history li.group")).to_have_count(1)  # the storm, grouped again
        await expect(page.locator("#approve")).to_be_enabled()

        retry = await client.approve_retry(chosen, "bob", "flaky disk")
        await expect(page.locator("#history li.event")).to_have_count(len(history_before) + 1)
        assert await revisions(page, "#history") == [*history_before, retry.revision]
    assert second.viewer_token == first.viewer_token


async def test_a_dashboard_started_after_the_log_was_pruned_shows_what_the_log_still_keeps(
    sidecar_factory: Callable[..., SidecarProcess], token_file: Path, dashboards: Dashboards, key: str
) -> None:
    sidecar = sidecar_factory("--operator-token-file", str(token_file), "--event-retention-count", "4")
    async with AsyncClient(sidecar.address) as client:
        for i in range(5):
            lease = await client.acquire(f"{key}/{i}", ttl=600)
            await client.release(lease.lease_id, RunStatus.SUCCEEDED)
        head = (await client.get(f"{key}/4")).revision
    # The log is pruned when the sidecar opens its database (and every 1000 events, or every minute).
    assert await asyncio.to_thread(sidecar.terminate) == 0
    await asyncio.to_thread(sidecar.start)
    dashboard = await dashboards.start(sidecar.address)
    hello = await read_hello(dashboard, lambda hello: hello["feed"] and hello["feed"][-1]["revision"] == head)
    shown = [event["revision"] for event in hello["feed"]]
    assert shown == list(range(head - 3, head + 1)), shown  # all the log keeps: its last 4
    assert len(hello["guards"]) == 5
    assert "watch down" not in dashboard.log() and "OUT_OF_RANGE" not in dashboard.log()


async def read_hello(dashboard: DashboardProcess, ready: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """The first hello a new page gets that is ``ready``."""

    async def read() -> dict[str, Any]:
        async with aiohttp.ClientSession() as http:
            while True:
                async with http.get(dashboard.url + "events", headers=dashboard.viewer()) as response:
                    assert response.status == 200
                    text = ""
                    async for chunk in response.content.iter_any():
                        text += chunk.decode()
                        if "\n\n" in text.split("event: hello\n", 1)[-1]:
                            break
                data = text.split("event: hello\ndata: ", 1)[1].split("\n\n", 1)[0]
                hello: dict[str, Any] = json.loads(data)
                if ready(hello):
                    return hello

    return await asyncio.wait_for(read(), START_TIMEOUT_S)


@BOTH_SIZES
async def test_a_sigtermed_sidecar_is_logged_once_as_stopped_and_the_open_history_carries_on_across_its_restart(
    guarded: SidecarProcess, dashboard: DashboardProcess, open_page: OpenPage, key: str
) -> None:
    page = await live_page(open_page, dashboard)
    banner, pill = page.locator("#banner"), page.locator("#connection")
    async with AsyncClient(guarded.address) as client:
        lease = await client.acquire(key, holder="worker-1", ttl=600)
        await storm(client, key, 2)
    await row(page, key).click()
    await expect(page.locator("#history li.event")).to_have_count(3)

    for stop in (1, 2):
        assert await asyncio.to_thread(guarded.terminate) == 0
        await expect(banner).to_have_attribute("data-reason", "stopped")
        await expect(banner).to_contain_text("Sidecar stopped; waiting for it")
        await expect(pill).to_have_text("sidecar stopped")
        await asyncio.to_thread(guarded.start)
        await expect(pill).to_have_attribute("data-state", "up")
        await expect(banner).to_be_hidden()
        async with AsyncClient(guarded.address) as client:
            if stop == 1:
                await storm(client, key, 1)
            else:
                await client.renew(lease.lease_id)
    async with AsyncClient(guarded.address) as client:
        released = await client.release(lease.lease_id, RunStatus.SUCCEEDED)
        await expect(page.locator("#history li.event[data-type='RELEASED']")).to_have_count(1)
        in_log = await logged(client, key, released.revision, task_key=key)
    assert await revisions(page, "#history") == in_log
    assert len(in_log) == 6  # acquired, 2 refusals, a refusal, renewed, released

    lines = [line for line in dashboard.log().splitlines() if "aiohttp.access" not in line]
    assert sum("sidecar stopped; waiting for it" in line for line in lines) == 2, lines
    assert sum("sidecar back" in line for line in lines) == 2, lines
    assert not any("watch down" in line or "UNAVAILABLE" in line for line in lines), lines


@BOTH_SIZES
async def test_a_wrong_operator_token_is_refused_when_entered_and_the_result_line_clears(
    guarded: SidecarProcess, dashboard: DashboardProcess, open_page: OpenPage, key: str
) -> None:
    first, second = f"{key}/1", f"{key}/2"
    async with AsyncClient(guarded.address) as client:
        await failed_guard(client, first)
        await failed_guard(client, second)
    page = await live_page(open_page, dashboard, clock=True)
    token_state, approve = page.locator("#token-state"), page.locator("#approve")
    await row(page, first).click()

    await use_operator_token(page, "not-the-operator-token")
    await expect(token_state).to_have_attribute("data-state", "refused")
    await expect(token_state).to_have_text("token not accepted: actions disabled")
    await expect(approve).to_be_disabled()
    assert await page.evaluate("() => sessionStorage.getItem('taskguard.operatorToken')") is None

    await use_operator_token(page)
    await expect(token_state).to_have_attribute("data-state", "accepted")
    await expect(approve).to_be_enabled()
    result = page.locator("#action-result")

    async def approve_retry() -> None:
        await approve.click()
        await page.fill("#reason", "checked the logs")
        await page.click("#reason-ok")
        await expect(result).to_have_attribute("data-outcome", "ok")

    await approve_retry()
    await row(page, second).click()  # another guard: the line was about the first
    await expect(result).to_have_text("")
    await approve_retry()
    await page.clock.fast_forward(11_000)
    await expect(result).to_have_text("")
    await expect(page.locator("#result-dismiss")).to_be_hidden()

    # The check changes nothing and answers only the dashboard's own page.
    async with AsyncClient(guarded.address) as client:
        assert (await client.get(first)).state is GuardState.RETRY_APPROVED
    async with aiohttp.ClientSession() as http:
        url = dashboard.url + "api/check-operator-token"
        operator = {"X-TaskGuard-Operator-Token": OPERATOR_TOKEN}
        async with http.post(url, json={}, headers=dashboard.viewer(**ACTION_HEADERS, **operator)) as response:
            assert (response.status, await response.json()) == (200, {"ok": True})
        async with http.post(url, json={}, headers=dashboard.viewer(**operator)) as response:
            assert (response.status, (await response.json())["code"]) == (403, "CROSS_SITE")
        async with http.post(url, json={}, headers={**ACTION_HEADERS, **operator}) as response:
            assert response.status == 401


@BOTH_SIZES
async def test_a_storm_of_refusals_is_one_expandable_line_and_dups_show_the_runs_count_and_the_keys_total(
    guarded: SidecarProcess, dashboard: DashboardProcess, open_page: OpenPage, key: str
) -> None:
    stormed, before, after = f"{key}/stormed", f"{key}/before", f"{key}/after"
    page = await live_page(open_page, dashboard)
    async with AsyncClient(guarded.address) as client:
        winner = await client.acquire(stormed, holder="winner-host", ttl=600)
        await client.acquire(before, ttl=600)
        await storm(client, stormed, 50)
        await client.acquire(after, ttl=600)
        await expect(feed(page, after, EventType.ACQUIRED)).to_have_count(1)

        group = page.locator(f'#feed li.group[data-task-key="{stormed}"][data-type="DUPLICATE_REFUSED"]')
        await expect(group).to_have_count(1)
        await expect(group).to_have_attribute("data-count", "50")
        await expect(page.locator("#feed > li")).to_have_count(4)  # after, the storm, before, the winner
        expand = group.locator("button.expand")
        await expect(expand).to_have_text("\u00d750")
        await expect(expand).to_have_attribute("aria-expanded", "false")
        await expect(group).to_contain_text(f"50 acquisitions refused; winner run {winner.run_id[:8]}… (winner-host)")
        for other in (before, after):
            await expect(feed(page, other, EventType.ACQUIRED)).to_be_in_viewport()
        members = group.locator("li.event")
        await expect(members).to_have_count(50)
        await expect(members.first).to_be_hidden()
        await expand.click()
        await expect(expand).to_have_attribute("aria-expanded", "true")
        await expect(members.nth(49)).to_be_visible()
        await expand.click()
        await expect(members.first).to_be_hidden()

        dups = row(page, stormed).locator("td.c-dups")
        await expect(dups).to_have_text("50 / 50")
        heading = page.locator("#guards th.c-dups")
        await expect(heading).to_have_text("dups run / key")
        await expect(heading).to_have_attribute("title", re.compile("in this run / in every run"))
        # A new run counts from 0; the key's total keeps what the log shows of the runs before.
        await client.release(winner.lease_id, RunStatus.SUCCEEDED)
        await client.acquire(stormed, ttl=600)
        await expect(dups).to_have_text("0 / 50")
        await storm(client, stormed, 2)
        await expect(dups).to_have_text("2 / 52")
        await expect(dups).to_have_attribute("title", re.compile(r"^2 refused in this run, 52 for this key"))


@BOTH_SIZES
async def test_stale_guards_stand_out_and_the_state_filter_shows_each_kind(
    guarded: SidecarProcess, dashboards: Dashboards, open_page: OpenPage, key: str
) -> None:
    dashboard = await dashboards.start(guarded.address, "--stale-after", "30s")
    keys = {name: f"{key}/{name}" for name in ("silent", "held", "expired", "failed", "approved", "done", "cancelled")}
    async with AsyncClient(guarded.address) as client:
        await client.acquire(keys["silent"], ttl=3600)
        expired = await client.acquire(keys["expired"], ttl=1)
        await failed_guard(client, keys["failed"])
        await failed_guard(client, keys["approved"])
        await client.approve_retry(keys["approved"], "alice", "fixed")
        done = await client.acquire(keys["done"])
        await client.release(done.lease_id, RunStatus.SUCCEEDED)
        await client.acquire(keys["cancelled"], ttl=600)
        await client.force_release(keys["cancelled"], "alice", "host lost")
        await next_event(client, keys["expired"], EventType.EXPIRED, expired.guard.revision)
        async with client.hold(keys["held"], holder="streamer"):
            page = await live_page(open_page, dashboard, clock=True)
            await page.fill("#filter-prefix", key)
            await expect(page.locator("tr.row")).to_have_count(len(keys))

            async def shown() -> set[str]:
                found: list[str] = await page.eval_on_selector_all("tr.row", "rows => rows.map(r => r.dataset.taskKey)")
                return {name for name, task_key in keys.items() if task_key in found}

            async def expect_stale(names: set[str]) -> None:
                await expect(page.locator("tr.row.stale")).to_have_count(len(names))
                for name in names:
                    await expect(row(page, keys[name]).locator("td.c-state .tag-stale")).to_have_text("stale")

            # The sidecar's own flag: an expired lease.
            await expect_stale({"expired"})
            # Time's: a unary lease silent for longer than --stale-after; a Hold stream's heartbeats are not
            # events, so only the sidecar's flag counts for it.
            await page.clock.fast_forward(31_000)
            await expect_stale({"expired", "silent"})
            await expect(page.locator("#counts .c-stale")).to_have_attribute("data-count", "2")
            await expect(row(page, keys["held"])).not_to_have_class(re.compile(r"\bstale\b"))
            await expect(row(page, keys["failed"])).to_have_class(re.compile(r"\bawaiting\b"))

            expected = {
                "attention": {"expired", "silent", "failed"},
                "awaiting": {"failed"},
                "stale": {"expired", "silent"},
                "RUNNING": {"silent", "held"},
                "SUCCEEDED": {"done"},
                "FAILED": {"failed"},
                "CANCELLED": {"cancelled"},
                "EXPIRED": {"expired"},
                "RETRY_APPROVED": {"approved"},
                "ABANDONED": set(),
                "": set(keys),
            }
            for option, names in expected.items():
                await page.select_option("#filter-state", option)
                await expect(page.locator("#shown")).to_have_attribute("data-shown", str(len(names)))
                assert await shown() == names, option
            await expect(page.locator("#empty")).to_be_hidden()
            await page.select_option("#filter-state", "ABANDONED")
            await expect(page.locator("#empty")).to_be_visible()


async def test_a_dashboard_restarted_while_the_sidecar_is_down_leaves_the_page_its_last_known_guards(
    guarded: SidecarProcess, dashboards: Dashboards, open_page: OpenPage, key: str
) -> None:
    first = await dashboards.start(guarded.address)
    page = await live_page(open_page, first)
    async with AsyncClient(guarded.address) as client:
        await client.acquire(key, holder="worker-1", ttl=600)
    await expect(row(page, key)).to_be_visible()
    await asyncio.to_thread(guarded.kill)
    await expect(page.locator("#connection")).to_have_attribute("data-state", "down")
    as_of = await page.locator("#last-known").get_attribute("data-as-of")
    assert await first.stop() == 0

    listen = first.url.removeprefix("http://").rstrip("/")
    await dashboards.start(guarded.address, listen=listen, token_path=first.viewer_token_path)
    await expect(page.locator("#connection")).to_have_attribute("data-state", "down")  # the new one's word
    await expect(row(page, key).locator("td.c-holder")).to_have_text("worker-1")
    await expect(page.locator("#last-known")).to_have_attribute("data-as-of", as_of or "?")
    await expect(feed(page, key, EventType.ACQUIRED)).to_have_count(1)

    await asyncio.to_thread(guarded.start)
    await expect(page.locator("#connection")).to_have_attribute("data-state", "up")
    await expect(page.locator("#last-known")).to_be_hidden()
    await expect(row(page, key).locator("td.c-holder")).to_have_text("worker-1")
    await expect(feed(page, key, EventType.ACQUIRED)).to_have_count(1)


# Keys under careful-* stay closed for a minute after a holder vanished; a short-* key's queue takes one.
QUEUE_RULES = (
    '[[rules]]\nname = "careful"\nmatch = "careful-*"\nlock_delay = "60s"\n'
    '[[rules]]\nname = "short"\nmatch = "short-*"\nmax_queue = 1\n'
)
# Markup in a holder is text on the page, never HTML.
MARKUP = '<b class="injected">n2</b>'


async def queue_up(
    stub: pb_grpc.TaskGuardStub,
    task_key: str,
    run_id: str,
    on_conflict: pb.OnConflict.ValueType = pb.ON_CONFLICT_QUEUE,
    max_wait_s: int | None = None,
    holder: str = "",
    outcome: pb.AcquireOutcome.ValueType = pb.ACQUIRE_OUTCOME_QUEUED,
) -> tuple[Any, pb.HoldResponse]:
    """A Hold stream asking for ``task_key`` as ``run_id`` (holder ``host-<run_id>`` by default), and its first
    answer (``outcome``)."""
    request = pb.AcquireRequest(
        task_key=task_key, run_id=run_id, holder=holder or f"host-{run_id}", on_conflict=on_conflict
    )
    if max_wait_s is not None:
        request.max_wait.FromSeconds(max_wait_s)
    call = stub.Hold()
    await call.write(pb.HoldRequest(acquire=request))
    answer: pb.HoldResponse = await asyncio.wait_for(call.read(), START_TIMEOUT_S)
    assert answer.outcome == outcome, answer
    return call, answer


async def test_a_queue_shows_its_length_and_waiters_the_feed_its_queued_and_superseded_runs_and_a_lock_delay_its_end(
    sidecar_factory: Callable[..., SidecarProcess],
    dashboards: Dashboards,
    open_page: OpenPage,
    workdir: Path,
    key: str,
) -> None:
    config = workdir / "taskguard.toml"
    config.write_text(QUEUE_RULES)
    sidecar = sidecar_factory("--config", str(config))
    dashboard = await dashboards.start(sidecar.address)
    page = await live_page(open_page, dashboard)
    async with AsyncClient(sidecar.address) as client, aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        lease = await client.acquire(key, holder="worker-1", ttl=300)
        first, answer = await queue_up(stub, key, "waiter-a", max_wait_s=600)
        assert answer.position == 1
        second, answer = await queue_up(stub, key, "waiter-b")
        assert answer.position == 2

        state = row(page, key).locator("td.c-state")
        await expect(state).to_have_attribute("data-queue", "2")
        await expect(state).to_have_text("RUNNING, queue 2")
        await client.acquire(f"{key}-alone", ttl=300)
        await expect(page.locator("tr.row")).to_have_count(2)
        await page.select_option("#filter-state", "queued")
        await expect(page.locator("tr.row")).to_have_count(1)
        await expect(row(page, key)).to_be_visible()
        await page.select_option("#filter-state", "")
        behind = f"behind run {lease.run_id[:8]}… (worker-1)"
        await expect(feed(page, key, EventType.QUEUED).locator(".text")).to_have_text(
            [
                f"run waiter-b (host-waiter-b) queued {behind}, position 2 of 2",
                f"run waiter-a (host-waiter-a) queued {behind}, position 1 of 1",
            ]
        )
        await row(page, key).click()
        waiters = page.locator("#detail-waiters li")
        await expect(waiters).to_have_count(2)
        assert await waiters.evaluate_all("items => items.map(item => item.dataset.runId)") == ["waiter-a", "waiter-b"]
        in_line = (await client.get(key)).waiters
        assert in_line[0].wait_until is not None and in_line[0].queued_at is not None
        await expect(waiters.nth(0)).to_contain_text("run waiter-a (host-waiter-a), since ")
        await expect(waiters.nth(0).locator(".w-since")).to_have_attribute("title", _utc(in_line[0].queued_at))
        await expect(waiters.nth(0).locator(".w-until")).to_have_attribute("title", _utc(in_line[0].wait_until))
        await expect(waiters.nth(1).locator(".w-until")).to_have_text("no max wait")

        # Keep-newest: the newer trigger takes the older one's place, last in line.
        older, answer = await queue_up(stub, key, "newest-1", pb.ON_CONFLICT_KEEP_NEWEST)
        newer, answer = await queue_up(stub, key, "newest-2", pb.ON_CONFLICT_KEEP_NEWEST, holder=MARKUP)
        assert answer.position == 3
        assert (await asyncio.wait_for(older.read(), START_TIMEOUT_S)).outcome == pb.ACQUIRE_OUTCOME_SUPERSEDED
        await expect(feed(page, key, EventType.SUPERSEDED).locator(".text")).to_have_text(
            f"run newest-1 superseded by run newest-2 ({MARKUP})"
        )
        await expect(waiters.nth(2)).to_contain_text(f"run newest-2 ({MARKUP}), since ")
        await expect(page.locator(".injected")).to_have_count(0)
        await expect(waiters.nth(2)).to_have_attribute("data-run-id", "newest-2")
        await expect(waiters.nth(2).locator(".tag")).to_have_text("keep-newest")
        await expect(state).to_have_attribute("data-queue", "3")

        first.cancel()
        await expect(feed(page, key, EventType.DEQUEUED).locator(".text")).to_contain_text(
            "run waiter-a left the queue: "
        )
        await expect(state).to_have_attribute("data-queue", "2")
        await expect(waiters).to_have_count(2)
        # The release serves the first in line.
        await client.release(lease.lease_id, RunStatus.SUCCEEDED)
        await expect(
            feed(page, key, EventType.ACQUIRED).filter(has_text="run waiter-b (host-waiter-b) acquired from the queue")
        ).to_have_count(1)
        await expect(state).to_have_attribute("data-queue", "1")
        await expect(waiters).to_have_count(1)
        for call in (second, newer, older):
            call.cancel()

        # A full queue refuses, and the feed says how many wait behind whom.
        short = f"short-{key}"
        held = await client.acquire(short, holder="worker-2", ttl=300)
        waiting, _ = await queue_up(stub, short, "full-1")
        refused, _ = await queue_up(stub, short, "full-2", outcome=pb.ACQUIRE_OUTCOME_QUEUE_FULL)
        await expect(feed(page, short, EventType.QUEUE_FULL_REFUSED).locator(".text")).to_have_text(
            f"refused run full-2 (host-full-2): the queue is full, 1 waiting behind run {held.run_id[:8]}…"
        )
        for call in (waiting, refused):
            call.cancel()

        # A lost holder's key under a lock-delay: the badge, and when it opens again.
        careful = f"careful-{key}"
        abandoned = await next_event(client, careful, EventType.ABANDONED, await abandon(sidecar.address, careful, "h"))
        until = abandoned.guard.lock_delay_until
        assert until is not None
        await expect(row(page, careful).locator("td.c-state .tag-lock-delay")).to_have_text("lock-delay")
        await row(page, careful).click()
        await expect(page.locator('#detail-fields dd[data-time="lock-delay-until"]')).to_have_attribute(
            "title", _utc(until)
        )
        await expect(page.locator("#detail-waiters")).to_be_hidden()


async def test_a_key_several_runs_hold_shows_how_many_and_the_others_in_its_pane(
    sidecar_factory: Callable[..., SidecarProcess], dashboards: Dashboards, open_page: OpenPage, key: str
) -> None:
    sidecar = sidecar_factory("--max-holders", "3")
    dashboard = await dashboards.start(sidecar.address)
    page = await live_page(open_page, dashboard)
    async with AsyncClient(sidecar.address) as client:
        older = await client.acquire(key, run_id="crawl-1", holder="worker-1", ttl=300)
        newer = await client.acquire(key, run_id="crawl-2", holder="worker-2", ttl=300)

        state = row(page, key).locator("td.c-state")
        await expect(state).to_have_text("RUNNING, 2 runs")
        await row(page, key).click()
        await expect(page.locator("#detail-fields")).to_contain_text("run crawl-1 (worker-1), token 1, since ")
        # A renewal of the older run is an event about that run: the row still counts both.
        await client.renew(older.lease_id, ttl=600)
        await expect(feed(page, key, EventType.RENEWED)).to_have_count(1)
        await expect(state).to_have_text("RUNNING, 2 runs")

        await client.release(older.lease_id, RunStatus.SUCCEEDED)
        await expect(state).to_have_text("RUNNING")
        await client.release(newer.lease_id, RunStatus.SUCCEEDED)
        await expect(state).to_have_text("SUCCEEDED")
