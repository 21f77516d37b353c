"""The live status page at `GET /` on the HTTP port, in a real browser: Debian's chromium,
headless, driven by Playwright (the `playwright` package from PyPI, launching the system's
chromium; Playwright's own browser downloads are never used).

The page loads and shows `identity` READY with live statistics; a job submitted during the test
appears and turns SUCCEEDED; a restart injected with `veraltheim kill` shows as a restart count
in the supervision tree; clicking the job shows its output; the simulated GPU gets a sparkline
history. A screenshot is saved under the test's tmp dir and in tests/e2e/artifacts/ (git-ignored).
With an auth file the page asks for a token (401), names a refusal (403), and works once a token
with the rights is pasted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from _helpers import binary_path, fp32_input
from test_auth import TOKENS, auth_file

BIN = str(binary_path())
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
# How long the page may take to show a change: it polls once a second, jobs take a moment to
# start, and a restart waits out its backoff. A bound for a hang, not a measure of speed.
SHOWN_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: the status page test needs Debian's chromium "
            "(scripts/test installs it with apt-get when it runs as root)",
            pytrace=False,
        )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.script_errors = errors
    yield pg
    context.close()


def cli(server, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    at = args.index("--") if "--" in args else len(args)
    argv = [BIN, *args[:at], "--server", server.grpc_url, *args[at:]]
    env = {"PATH": "/usr/bin:/bin"}
    if token:
        env["VERALTHEIM_TOKEN"] = token
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, f"{argv}: {out.stderr}"
    return out


def test_the_page_shows_models_jobs_restarts_logs_and_gpus_live(server_factory, page: Page,
                                                              tmp_path):
    srv = server_factory(extra_args=["--simulate-gpus", "1x16GiB"])
    page.goto(srv.http_url + "/")

    # identity READY, with statistics that follow the requests it answers.
    identity = page.locator('#models tr[data-model="identity"]')
    expect(identity.locator(".state")).to_have_text("READY", timeout=SHOWN_MS)
    client = srv.client()
    for _ in range(40):
        client.infer("identity", [fp32_input(np.ones((1, 4), np.float32))])
    page.wait_for_function(
        """() => {
            const c = document.querySelector('#models tr[data-model="identity"] .rps');
            return c !== null && parseFloat(c.textContent) > 0;
        }""",
        timeout=SHOWN_MS,
    )
    expect(identity.locator(".p50")).to_have_text(re.compile(r"\d.*(µs|ms|s)$"))
    expect(identity.locator(".batch")).not_to_have_text("—")
    expect(identity.locator(".device")).to_have_text("cpu")

    # A job submitted now appears, and turns SUCCEEDED.
    job = cli(srv, "jobs", "submit", "--name", "page-e2e", "--",
              "sh", "-c", "echo hello-from-the-status-page; sleep 1").stdout.strip()
    row = page.locator(f'#jobs tr[data-job="{job}"]')
    expect(row).to_be_visible(timeout=SHOWN_MS)
    expect(row.locator(".name")).to_have_text("page-e2e")
    expect(row.locator(".state")).to_have_text("SUCCEEDED", timeout=SHOWN_MS)

    # A restart injected with `veraltheim kill` shows in the tree.
    restarts = page.locator('[data-path="MessageBusSupervisor/QueueManager"] .restarts')
    expect(restarts).to_have_text("0")
    cli(srv, "kill", "MessageBusSupervisor/QueueManager")
    expect(restarts).to_have_text("1", timeout=SHOWN_MS)
    expect(page.locator('[data-path="MessageBusSupervisor/QueueManager"] .failure')).to_contain_text("killed")

    # Clicking the job shows its output.
    row.click()
    expect(page.locator("#logs-panel")).to_be_visible()
    expect(page.locator("#logs")).to_contain_text("hello-from-the-status-page", timeout=SHOWN_MS)

    # The simulated GPU, with a history drawn as a sparkline.
    gpu = page.locator('#gpus .gpu[data-gpu="0"]')
    expect(gpu).to_have_count(1)
    expect(gpu.locator(".memory")).to_contain_text("16.0 GiB")
    page.wait_for_function(
        """() => {
            const p = document.querySelector('#gpus .gpu[data-gpu="0"] .spark polyline');
            return p !== null && p.getAttribute('points').split(' ').length >= 3;
        }""",
        timeout=SHOWN_MS,
    )
    expect(page.locator("#notice")).to_be_hidden()

    shot = tmp_path / "status-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "status-page.png")
    assert page.script_errors == []


def test_with_an_auth_file_the_page_asks_for_a_token_and_names_refusals(server_factory,
                                                                        page: Page, tmp_path):
    path = tmp_path / "auth.toml"
    path.write_text(auth_file(["alice", "bob", "ops"]))
    srv = server_factory(extra_args=["--auth-file", str(path), "--jobs-run-as", "nobody:nogroup"])
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if "/api/" in r.url else None)
    page.goto(srv.http_url + "/")

    # No token: the page is there and says what is missing, rather than staying blank.
    notice = page.locator("#notice")
    expect(notice).to_contain_text("401", timeout=SHOWN_MS)
    expect(notice).to_contain_text("bearer token")
    expect(page.locator("#models-section > .error")).to_contain_text("Not signed in (401)")
    expect(page.locator("#jobs-section > .error")).to_be_visible()
    # Refused, the page stops asking until a token is pasted (no refusal a second in the
    # audit log): over three of its polling periods, no request.
    before = len(asked)
    assert before >= 2, asked
    page.wait_for_timeout(3000)
    assert len(asked) == before, asked[before:]

    # alice may read her jobs but not the server's status: the refusal is named there.
    page.fill("#token", TOKENS["alice"])
    page.click("#token-form button[type=submit]")
    expect(page.locator("#models-section > .error")).to_contain_text("Refused (403)",
                                                                  timeout=SHOWN_MS)
    expect(page.locator("#models-section > .error")).to_contain_text("'alice' may not read")
    expect(page.locator("#jobs-section > .error")).to_be_hidden()
    expect(notice).to_be_hidden()
    # Bob's job is not alice's to see.
    bobs = cli(srv, "jobs", "submit", "--name", "bobs", "--", "true",
               token=TOKENS["bob"]).stdout.strip()
    alices = cli(srv, "jobs", "submit", "--name", "alices", "--", "true",
                 token=TOKENS["alice"]).stdout.strip()
    expect(page.locator(f'#jobs tr[data-job="{alices}"]')).to_be_visible(timeout=SHOWN_MS)
    expect(page.locator(f'#jobs tr[data-job="{bobs}"]')).to_have_count(0)

    # The operator's token: everything shows. The token lives in this tab's sessionStorage only.
    page.click("#forget-token")
    page.fill("#token", TOKENS["ops"])
    page.click("#token-form button[type=submit]")
    expect(page.locator('#models tr[data-model="identity"] .state')).to_have_text(
        "READY", timeout=SHOWN_MS)
    expect(page.locator(f'#jobs tr[data-job="{bobs}"]')).to_be_visible(timeout=SHOWN_MS)
    assert page.evaluate("sessionStorage.getItem('veraltheim.token')") == TOKENS["ops"]
    assert page.evaluate("localStorage.length") == 0
    assert page.script_errors == []
