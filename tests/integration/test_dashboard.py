"""``taskguard dashboard`` in a real browser: a real sidecar process, a real dashboard process, Debian's chromium.

Chromium is driven by Playwright (``executable_path``: no browser download). Every wait is on the page's
elements or the sidecar's answers, under a timeout; figures (render and filter times) are printed, and only
generous bounds are asserted. The page reads nothing without the dashboard's viewer token: the tests type it
in, as a person would, and try every route without it, also as another OS user (``nobody``).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, Page, async_playwright, expect

from taskguard_client import AsyncClient, Conflict, EventType, GuardState, Lease, RunStatus
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


@pytest.fixture
async def dashboard(guarded: SidecarProcess, dashboards: Dashboards) -> DashboardProcess:
    return await dashboards.start(guarded.address)


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: python3 .ci/dev.py setup installs Debian's chromium")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


OpenPage = Callable[[str], Awaitable[Page]]


@pytest.fixture
async def open_page(browser: Browser) -> AsyncIterator[OpenPage]:
    """Open the dashboard in a fresh browser context; fail the test on any script error in the page."""
    errors: list[str] = []

    async def open_(url: str) -> Page:
        context = await browser.new_context(viewport={"width": 1400, "height": 900})
        page = await context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        await page.goto(url)
        return page

    yield open_
    assert errors == [], errors


async def unlock(page: Page, dashboard: DashboardProcess) -> None:
    """Give the page the viewer token, as a person pastes it."""
    await expect(page.locator("#locked")).to_be_visible()
    await page.fill("#viewer-token", dashboard.viewer_token)
    await page.click("#unlock")
    await expect(page.locator("#locked")).to_be_hidden()


async def live_page(open_page: OpenPage, dashboard: DashboardProcess) -> Page:
    page = await open_page(dashboard.url)
    await unlock(page, dashboard)
    await expect(page.locator("#connection")).to_have_attribute("data-state", "up")
    assert dashboard.viewer_token not in page.url
    return page


def row(page: Page, task_key: str) -> Any:
    return page.locator(f'tr.row[data-task-key="{task_key}"]')


def feed(page: Page, task_key: str, event_type: EventType) -> Any:
    return page.locator(f'#feed li[data-task-key="{task_key}"][data-type="{event_type.value}"]')


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
        cells = row(page, key).locator("td")
        await expect(cells.nth(0)).to_have_text(key.split("::")[0])
        await expect(cells.nth(1)).to_have_text("job")
        await expect(cells.nth(2)).to_have_text("RUNNING")
        await expect(cells.nth(3)).to_have_text(lease.run_id)
        await expect(cells.nth(4)).to_have_text("worker-7")
        await expect(cells.nth(8)).to_have_text(str(lease.fencing_token))
        await expect(feed(page, key, EventType.ACQUIRED)).to_have_count(1)

        await client.release(lease.lease_id, RunStatus.SUCCEEDED)
        await expect(row(page, key)).to_have_attribute("data-state", "SUCCEEDED")
        await expect(cells.nth(2)).to_have_text("SUCCEEDED")
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
    await expect(row(page, key).locator("td").nth(9)).to_have_text("100")
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
                assert answer["code"] == "PERMISSION_DENIED" and "operator" in answer["error"], answer
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
        logged = []
        async with client.watch(start_revision=first.guard.revision) as events:
            async for event in events:
                logged.append(event.revision)
                if event.revision >= last.guard.revision:
                    break
    await expect(row(page, f"{key}/0")).to_have_attribute("data-state", "FAILED")
    await expect(row(page, f"{key}/1").locator("td").nth(9)).to_have_text("3")
    shown = await page.eval_on_selector_all("#feed li", "items => items.map(item => Number(item.dataset.revision))")
    shown.reverse()  # newest first on the page
    shown = [revision for revision in shown if revision <= last.guard.revision]
    assert len(logged) == 8  # acquire, acquire, release, 3 refusals, acquire, acquire
    assert shown == logged, f"page {shown} != sidecar's log {logged}"


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
    await expect(row(page, key).locator("td").nth(4)).to_have_text("secret-holder")
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
        async with gate:  # a holder per session: the sidecar caps the guards one holder may run
            return await client.acquire(task_key, ttl=3600, holder=f"worker-{task_key.split('::')[0]}")

    return await asyncio.gather(*(one(task_key) for task_key in keys))


async def _metrics(page: Page) -> dict[str, Any]:
    figures: dict[str, Any] = await page.evaluate("() => ({...window.taskguardDashboard.metrics})")
    return figures


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_ten_thousand_guards_load_and_filter_without_freezing(
    guarded: SidecarProcess, dashboards: Dashboards, open_page: OpenPage
) -> None:
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
        await expect(row(page, target).locator("td").nth(9)).to_have_text("500")
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
