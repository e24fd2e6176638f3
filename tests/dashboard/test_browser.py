"""The dashboard in a real browser: a live server on 127.0.0.1 (tiny model, torch engine)
serves a few requests with three decoders, headless Chromium opens ``/dashboard``, and the
table and charts must show those decoders with non-zero values. A screenshot is saved to the
test's tmp dir, or to ``$POWERSERVE_ARTIFACTS_DIR`` when set.

Needs Debian's ``chromium`` (``apt-get install -y chromium``; CI installs it) and the
``playwright`` package from the ``test`` extra (it drives the system Chromium; no browser
download). Both missing is a failure, not a skip, so CI cannot pass without the check.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from powerserve.engine.torch_engine import TorchEngine
from powerserve.testing import LiveServer
from tests.serving.tiny_app import MODEL

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DECODERS: dict[str, Any] = {
    "standard": "standard",
    "temperature": {"name": "temperature", "alpha": 2.0},
    "power_mcmc": {"name": "power_mcmc", "block_size": 4, "mcmc_steps": 2},
}
CHARTED = ("latency_p95", "latency_p50", "cost_multiplier", "tokens_per_s")


def chromium_path() -> str:
    for candidate in (os.environ.get("POWERSERVE_CHROMIUM"), "chromium", "chromium-browser"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    pytest.fail(
        "headless Chromium is needed for the dashboard browser test: install Debian's package with "
        "`apt-get install -y chromium` (or point POWERSERVE_CHROMIUM at a Chromium binary)"
    )


@pytest.fixture
def live_server(engine: TorchEngine) -> Iterator[LiveServer]:
    with LiveServer(engine) as server:
        yield server


def send_requests(base: str) -> None:
    with httpx.Client(base_url=base, timeout=60) as http:
        for name, decoder in DECODERS.items():
            for seed in range(2):
                body = {"model": MODEL, "prompt": f"A story about {name}", "decoder": decoder, "seed": seed}
                r = http.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text


def test_dashboard_charts_show_each_decoder(live_server: LiveServer, tmp_path: Path) -> None:
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test drives Chromium with playwright: pip install -e '.[test]'")

    send_requests(live_server.base)
    shots = Path(os.environ.get("POWERSERVE_ARTIFACTS_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    requested: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(f"{live_server.base}/dashboard?poll_ms=500")
            # Wait for a poll that drew a series for every decoder in every charted panel.
            page.wait_for_function(
                """([decoders, charts]) => decoders.every(d => charts.every(c => {
                       const path = document.querySelector(`#chart-${c} path.series[data-decoder="${d}"]`);
                       return path && Number(path.dataset.points) > 0 && Number(path.dataset.last) > 0;
                   }))""",
                arg=[list(DECODERS), list(CHARTED)],
                timeout=20_000,
            )
            rows = page.eval_on_selector_all(
                "#totals tbody tr[data-decoder]",
                """rows => Object.fromEntries(rows.map(r => [r.dataset.decoder, Object.fromEntries(
                       [...r.querySelectorAll('td[data-field]')].map(td => [td.dataset.field, td.dataset.value]))]))""",
            )
            status = page.text_content("#status") or ""
            page.screenshot(path=str(shots / "dashboard.png"), full_page=True)
        finally:
            browser.close()

    assert status.startswith("live"), status
    for name in DECODERS:
        row = rows[name]
        assert int(row["ok"]) >= 2
        assert float(row["latency_p95"]) > 0
        assert float(row["cost_multiplier"]) >= 1
    assert rows["standard"]["acceptance_rate"] == ""  # MCMC only
    assert 0 <= float(rows["power_mcmc"]["acceptance_rate"]) <= 1
    assert float(rows["power_mcmc"]["cost_multiplier"]) > float(rows["standard"]["cost_multiplier"])
    assert requested and all(url.startswith(live_server.base + "/") for url in requested), requested
    assert (shots / "dashboard.png").stat().st_size > 10_000
