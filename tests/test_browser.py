"""One real browser session: `saekit app` on a free local port, driven in headless Chromium
(Debian's package, through Playwright's Python API; no Playwright browser download).

Without Chromium or Playwright the test skips, except under CI (``CI`` set), where it fails:
`.ci/run` installs Chromium, so its absence there is a broken setup, not a reason to skip."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.app_helpers import PROMPT, analyzed_sae, make_sae

LATENT, COEF, NEW_TOKENS = 5, 300.0, 20  # the page's default number of new tokens


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        why = "headless Chromium (Debian package `chromium`) and the `playwright` Python package are needed"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{why}; under CI this is an error (`.ci/run` installs Chromium)")
        pytest.skip(why)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc, port: int, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"saekit app exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"saekit app did not answer on port {port} within {timeout} s")


@pytest.fixture
def app_server(model, tmp_path):
    chromium = _chromium()
    sae_dir = analyzed_sae(model, tmp_path / "sae")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "saekit", "app", "--sae", sae_dir, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_healthy(proc, port)
        yield f"http://127.0.0.1:{port}", chromium
    finally:  # the server runs in its own session: end that process group, no stray process
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _settle(page) -> None:
    """Wait until the app has finished the rerun an input started (Streamlit shows its status
    widget meanwhile), so the next click is not lost in a rerun on a busy machine."""
    from playwright.sync_api import expect

    page.wait_for_timeout(1000)
    expect(page.get_by_test_id("stStatusWidget")).to_be_hidden(timeout=120_000)


def _set_number(page, label: str, value) -> None:
    """Type ``value`` into a number input and commit it; again if a rerun that was still
    running replaced the widget and dropped the typing."""
    from playwright.sync_api import expect

    box = page.get_by_label(label, exact=True)
    for _ in range(3):
        box.fill(str(value))
        box.press("Enter")
        _settle(page)
        if float(box.input_value()) == float(value):
            return
    expect(box).to_have_value(str(value))  # fails with the value it kept


def test_feature_card_and_steering_in_chromium(app_server, model, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from saekit.steering import Add, generate

    url, chromium = app_server
    expected = generate(model, PROMPT, [Add(make_sae(), LATENT, COEF)], max_new_tokens=NEW_TOKENS)
    assert expected.steered != expected.unsteered
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(90_000)
        page.goto(url)
        # Features: open the card of latent 3
        latent = page.get_by_label("Latent", exact=True)
        latent.fill("3")
        latent.press("Enter")
        expect(page.get_by_role("heading", name="Latent 3")).to_be_visible()
        expect(page.get_by_text("Top activating contexts")).to_be_visible()
        page.screenshot(path=str(tmp_path / "feature_card.png"), full_page=True)
        # Steering: one "add" intervention, then generate
        page.get_by_test_id("stSidebar").get_by_text("Steering", exact=True).click()
        expect(page.get_by_role("heading", name="Steering")).to_be_visible()
        _settle(page)
        expect(page.get_by_label("Latent", exact=True)).to_have_count(1)  # the Features page's input is gone
        # A number typed while a rerun is still running can be dropped by Streamlit even though
        # the box shows it, so check what the server generated and type again if it differs.
        steered = page.get_by_text(PROMPT + expected.steered)
        for _ in range(3):
            _set_number(page, "Latent", LATENT)
            _set_number(page, "Value", COEF)
            page.get_by_role("button", name="Generate").click()
            expect(page.get_by_text("Steered", exact=True)).to_be_visible()
            _settle(page)
            if steered.count():
                break
        expect(steered).to_be_visible()
        expect(page.get_by_text(PROMPT + expected.unsteered)).to_be_visible()
        shot = tmp_path / "steering.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
