"""Make docs/dashboard-1280x720.png and docs/dashboard-1920x1080.png: a real sidecar and dashboard, guards in
every state (one awaiting approval, stale ones, a storm of refusals), in headless chromium.

    .venv/bin/python -m tests.integration.dashboard_screenshot [OUTPUT_FOLDER]

Not a test (pytest does not collect it); it reuses the browser tests' processes, seeds and chromium settings.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

from playwright.async_api import async_playwright, expect

from taskguard_client import AsyncClient
from tests.integration.test_dashboard import (
    CHROMIUM,
    CHROMIUM_ARGS,
    OPERATOR_TOKEN,
    SEEDED_SIDECAR_ARGS,
    SIZES,
    Dashboards,
    seed,
    storm,
    unlock,
)
from tests.support import ROOT, SidecarProcess

OUTPUT = ROOT / "docs"


async def main(folder: Path) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="tg-shot-", dir="/tmp"))
    token_file = workdir / "operator.token"
    token_file.write_text(OPERATOR_TOKEN + "\n")
    sidecar = SidecarProcess(workdir, ("--operator-token-file", str(token_file), *SEEDED_SIDECAR_ARGS))
    dashboards = Dashboards(workdir)
    try:
        sidecar.start()
        dashboard = await dashboards.start(sidecar.address)
        async with AsyncClient(sidecar.address) as client:
            seeded = await seed(client, sidecar.address)
            await storm(client, seeded.stormed, 12)
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            for width, height in SIZES:
                # A zone other than UTC, to show the page's times as they are on most desks: local, zone named.
                context = await browser.new_context(
                    viewport={"width": width, "height": height}, timezone_id="Europe/Berlin"
                )
                page = await context.new_page()
                await page.goto(dashboard.url)
                await unlock(page, dashboard)
                await expect(page.locator("#connection")).to_have_attribute("data-state", "up")
                await expect(page.locator(f'tr.row[data-task-key="{seeded.stormed}"] td.c-dups')).to_have_attribute(
                    "data-run", "12"
                )
                await page.fill("#token", OPERATOR_TOKEN)
                await page.fill("#operator", "alice")
                await page.click("#use-token")
                await expect(page.locator("#token-state")).to_have_attribute("data-state", "accepted")
                await page.click(f'tr.row[data-task-key="{seeded.failed}"]')
                await expect(page.locator("#history li[data-type='RETRY_REFUSED']")).to_be_visible()
                await page.mouse.move(0, 0)
                output = folder / f"dashboard-{width}x{height}.png"
                await page.screenshot(path=str(output))
                print(f"wrote {output}")
                await context.close()
            await browser.close()
    finally:
        for started in dashboards.started:
            await started.stop()
        sidecar.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT))
