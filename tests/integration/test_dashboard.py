"""The coordinator's dashboard in a real headless browser (Debian's chromium, driven by playwright
through ``executable_path``: nothing is downloaded). The page loads, shows a node and a job, and
updates by itself when the job's task finishes. With VERIMESH_SCREENSHOT=PATH it also writes a
screenshot there (docs/dashboard.png is made that way)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.mesh_harness import Mesh, _node_id

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_the_dashboard_shows_nodes_and_jobs_and_updates_live(mesh: Mesh) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "chromium is a test dependency (make system-deps installs it)"
    first = mesh.submit("--wait", "--timeout", "1s")  # nobody runs it yet: the wait times out (exit 3)
    assert first.returncode == 3 and "still open" in first.stderr
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 700})
            page.goto(mesh.url + "/")
            page.wait_for_selector("tr.job[data-state='open']", timeout=15_000)
            assert "pending" in page.inner_text("#jobs") and "none" in page.inner_text("#slashes")
            # A cheater takes the task first: its slash appears on the page, then an honest node redoes it.
            cheater = subprocess.Popen(
                [sys.executable, "-m", "verimesh", "redteam", "--mesh", mesh.url, "--strategy", "perturb-final",
                 "--keys-dir", "rk", "--idle-exit", "20"],
                cwd=mesh.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            mesh.procs.append(cheater)
            page.wait_for_function("document.querySelector('#slashes').innerText.includes('fraud')", timeout=60_000)
            mesh.node("honest")
            page.wait_for_selector("tr.job[data-state='done']", timeout=60_000)  # the page polls: no reload
            nodes = page.inner_text("#nodes")
            assert _node_id(mesh, "honest") in nodes and "yes" in nodes  # online
            assert "accept" in page.inner_text("#jobs")
            assert "entries" in page.inner_text("#ledger")
            shot = os.environ.get("VERIMESH_SCREENSHOT")
            if shot:
                page.screenshot(path=shot, full_page=True)
        finally:
            browser.close()
    assert json.loads(json.dumps(mesh.status()))["jobs"][0]["state"] == "done"
