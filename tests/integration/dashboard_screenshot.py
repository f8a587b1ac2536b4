"""Make docs/dashboard.png: a real sidecar and dashboard, a few guards, a failed one, a feed, in headless chromium.

    .venv/bin/python -m tests.integration.dashboard_screenshot [OUTPUT.png]

Not a test (pytest does not collect it); it reuses the browser tests' processes and chromium settings.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

from playwright.async_api import async_playwright, expect

from taskguard_client import AsyncClient, RunStatus
from tests.integration.test_dashboard import CHROMIUM, CHROMIUM_ARGS, OPERATOR_TOKEN, Dashboards, unlock
from tests.support import ROOT, SidecarProcess

OUTPUT = ROOT / "docs" / "dashboard.png"


async def _seed(client: AsyncClient) -> str:
    """Guards in every state worth seeing; the winner of the duplicate storm ``_storm`` makes."""
    report = await client.acquire("billing-7f2a::nightly-report", holder="worker-a:4121", ttl=900)
    await client.acquire("billing-7f2a::email-digest", holder="worker-b:977", ttl=900)
    await client.acquire("billing-7f2a::invoice-pdf", holder="worker-b:978", ttl=900)
    await client.acquire("search-19c4::reindex-shard-3", holder="indexer-2:31", ttl=900)
    await client.acquire("search-19c4::reindex-shard-4", holder="indexer-3:17", ttl=900)
    done = await client.acquire("search-19c4::warm-cache", holder="cron:88", ttl=900)
    await client.release(done.lease_id, RunStatus.SUCCEEDED)
    failed = await client.acquire("ml-team-03::train-ranker", holder="gpu-1:7712", ttl=900)
    await client.release(failed.lease_id, RunStatus.FAILED, "exit code 137 (out of memory)")
    await client.acquire("ml-team-03::train-ranker", holder="scheduler:42", on_conflict="return")
    await client.acquire("ml-team-03::eval-suite", holder="gpu-2:310", ttl=900)
    await client.acquire("ops-0a1b::rotate-logs", holder="cron:91", ttl=1)  # expires: stale
    held = await client.acquire("ops-0a1b::backup-db", holder="backup-1:220", ttl=900)
    await client.release(held.lease_id, RunStatus.CANCELLED, "operator stopped it")
    await client.acquire("ops-0a1b::backup-db", holder="backup-1:221", ttl=900)
    for task in ("sync-crm", "export-csv"):
        lease = await client.acquire(f"sales-44d0::{task}", holder="worker-f:12", ttl=900)
        await client.release(lease.lease_id, RunStatus.SUCCEEDED)
    return report.task_key


async def _storm(client: AsyncClient, task_key: str) -> None:
    for i in range(12):
        await client.acquire(task_key, holder=f"worker-{'cde'[i % 3]}:{5000 + i}", on_conflict="return")


async def main(output: Path) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="tg-shot-", dir="/tmp"))
    token_file = workdir / "operator.token"
    token_file.write_text(OPERATOR_TOKEN + "\n")
    sidecar = SidecarProcess(workdir, ("--operator-token-file", str(token_file)))
    dashboards = Dashboards(workdir)
    try:
        sidecar.start()
        dashboard = await dashboards.start(sidecar.address)
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1440, "height": 720})
            await page.goto(dashboard.url)
            await unlock(page, dashboard)
            await expect(page.locator("#connection")).to_have_attribute("data-state", "up")
            async with AsyncClient(sidecar.address) as client:
                stormed = await _seed(client)
                await expect(page.locator('tr.row[data-state="EXPIRED"]')).to_be_visible(timeout=15_000)
                await _storm(client, stormed)
            await expect(page.locator(f'tr.row[data-task-key="{stormed}"] td').nth(9)).to_have_text("12")
            await page.fill("#token", OPERATOR_TOKEN)
            await page.fill("#operator", "alice")
            await page.click("#use-token")
            await page.click('tr.row[data-task-key="ml-team-03::train-ranker"]')
            await expect(page.locator("#history li[data-type='RETRY_REFUSED']")).to_be_visible()
            await page.mouse.move(0, 0)
            await page.screenshot(path=str(output))
            await browser.close()
    finally:
        for started in dashboards.started:
            await started.stop()
        sidecar.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {output}")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT))
