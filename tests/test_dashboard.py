"""The dashboard in a real headless browser (Debian chromium + chromium-driver, driven by selenium).

Skipped with the reason when chromium, chromedriver or selenium is missing, except under CI=true,
where a missing browser must fail the run instead of silently skipping the only UI test.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiohttp import web

from fastroute.ops.actions import audit_events
from fastroute.ops.api import make_app
from fastroute.config import Config
from fastroute.spool import Outcome, OutcomeKind, Spool

from test_ops import AGE, STUDY_A, fill, make_config

CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync")


def _require(found: Any, reason: str) -> Any:
    if not found:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (required when CI=true: apt-get install chromium chromium-driver; "
                        "pip install selenium)")
        pytest.skip(reason)
    return found


def _which(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if path:
            return path
    return None


class LiveServer:
    """The app on a free loopback port, on its own event loop thread (the browser needs a real socket).

    stop() and start() again serve a fresh app on the same port: the router's http process going
    away and coming back (with an empty throughput history, as after a configuration reload)."""

    def __init__(self, cfg: Config, spool: Spool, config_path: str) -> None:
        self.args = (cfg, spool, config_path)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dashboard-server", daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.url = ""

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        self.start()
        return self

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(15)

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(15)
            self.runner = None

    async def _start(self) -> None:
        self.runner = web.AppRunner(make_app(*self.args, monitor_interval=0.5), access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        host, self.port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{self.port}"

    def __exit__(self, *_: Any) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _require(False, "selenium is not installed (pip install selenium)")
        raise
    chromium = _require(_which("chromium", "chromium-browser"), "chromium is not installed")
    driver_path = _require(_which("chromedriver"), "chromedriver (Debian: chromium-driver) is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1400,1200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, predicate: Any, what: str, timeout: float = 10.0) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    def check(d: Any) -> Any:
        try:
            return predicate(d)
        except StaleElementReferenceException:   # the table was re-rendered under us
            return False
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(check, message=f"waiting for {what}")


def rollup(study: Any, dest: str) -> dict[str, str]:
    """One destination's row of a study's roll-up table, by column."""
    from selenium.webdriver.common.by import By
    row = study.find_element(By.CSS_SELECTOR, f'table.rollup tr[data-destination="{dest}"]')
    return {col: str(row.find_element(By.CSS_SELECTOR, f"td.{col}").text)
            for col in ("routed", "delivered", "waiting", "failed", "dropped")}


def test_dashboard_shows_queues_searches_and_refreshes(tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    cfg, path = make_config(tmp_path)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    try:
        fill(spool, time.time() - AGE)
        with LiveServer(cfg, spool, str(path)) as server:
            browser.get(server.url + "/")

            def cell(dest: str, col: str) -> str:
                found = browser.find_elements(By.CSS_SELECTOR, f'tr[data-destination="{dest}"] td.{col}')
                return str(found[0].text) if found else ""

            def enter_token(value: str) -> None:
                box = browser.find_element(By.ID, "token")
                box.clear()
                box.send_keys(value)
                browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", box)

            # A token is configured: the shell loads, the data calls are refused until it is entered.
            auth = browser.find_element(By.ID, "auth")
            wait(browser, lambda d: auth.is_displayed() and "enter it in the token field" in auth.text,
                 "the token-needed message")
            assert not browser.find_elements(By.CSS_SELECTOR, 'tr[data-destination="pacs"]')
            wait(browser, lambda d: d.find_element(By.ID, "updated").text == "waiting for the API token",
                 "polling paused until a token is entered")
            enter_token("wrong")
            wait(browser, lambda d: "was refused" in auth.text, "the wrong-token message")
            enter_token("s3cret")
            wait(browser, lambda d: cell("pacs", "pending") == "2", "the pacs row with 2 pending")
            assert not auth.is_displayed()
            browser.refresh()   # kept in sessionStorage: entered once per tab
            wait(browser, lambda d: cell("pacs", "pending") == "2", "the pacs row again after a reload")
            assert cell("vna", "pending") == "3" and cell("pacs", "failed") == "1"
            assert cell("unrouted", "pending") == "1" and cell("pacs", "delivered") == "1"
            assert cell("pacs", "oldest").endswith("m") or cell("pacs", "oldest").endswith("s")
            assert "0xA900" in browser.find_element(By.CSS_SELECTOR, "#failures tbody").text
            assert "oldest waiting object" in browser.find_element(By.ID, "alerts").text
            assert browser.find_element(By.ID, "chart").size["height"] > 100

            browser.find_element(By.ID, "search-value").send_keys(STUDY_A)
            browser.find_element(By.ID, "search-button").click()
            wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#search-results .study")) == 1,
                 "the study rolled up")
            assert browser.current_url.endswith(f"#/study/{STUDY_A}")   # the shareable link
            study = browser.find_element(By.CSS_SELECTOR, "#search-results .study")
            assert rollup(study, "pacs") == {"routed": "3", "delivered": "1", "waiting": "1", "failed": "1",
                                             "dropped": "0"}
            assert rollup(study, "vna")["waiting"] == "3"
            assert not study.find_elements(By.CSS_SELECTOR, ".object")   # instances only on demand
            study.find_element(By.CSS_SELECTOR, "details.series summary").click()
            wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#search-results .object")) == 3,
                 "three objects of the study, once its series is opened")
            first = browser.find_elements(By.CSS_SELECTOR, "#search-results .object")[0]
            assert "from CT1 (10.0.0.5)" in first.text and "ct-to-pacs" in first.text
            steps = {s.get_attribute("data-destination"): s for s in first.find_elements(By.CSS_SELECTOR, ".step")}
            assert steps["pacs"].get_attribute("data-state") == "delivered"
            assert steps["vna"].get_attribute("data-state") == "pending"
            assert "0xA700" in steps["vna"].text and "1 attempt(s)" in steps["vna"].text
            # What each destination gets (issue 15): neither changes anything here
            first.find_element(By.XPATH, './/button[text()="What each destination gets"]').click()
            wait(browser, lambda d: len(first.find_elements(By.CSS_SELECTOR, ".diff li")) == 2, "the preview")
            got = {li.find_element(By.TAG_NAME, "strong").text: li.get_attribute("data-result")
                   for li in first.find_elements(By.CSS_SELECTOR, ".diff li")}
            assert got == {"pacs": "unchanged", "vna": "unchanged"}

            # Live: deliver what pacs has pending and watch the row follow.
            claimed, _ = spool.claim("pacs", 10)
            spool.settle("pacs", [Outcome(c.oid, OutcomeKind.DELIVERED, status=0) for c in claimed])
            wait(browser, lambda d: cell("pacs", "pending") == "0" and cell("pacs", "delivered") == "3",
                 "the refreshed pacs row")

            # An action with the token already entered: pause pacs from its row.
            browser.find_element(By.CSS_SELECTOR, 'tr[data-destination="pacs"] button.pause').click()
            wait(browser, lambda d: spool.is_paused("pacs"), "pacs paused")
            wait(browser, lambda d: "paused" in d.find_element(
                By.CSS_SELECTOR, 'tr[data-destination="pacs"] td.state').text, "the paused badge")
            assert browser.find_element(By.ID, "message").text == (
                "pacs paused: its queue keeps filling; nothing is sent until it is resumed.")
            assert not browser.find_elements(By.CSS_SELECTOR, 'tr[data-destination="pacs"] button.send-now')

            # Send now to vna (its A1 waits an hour after 0xA700): asked first, answered in words.
            def send_now_dialog() -> Any:
                browser.find_element(By.CSS_SELECTOR, 'tr[data-destination="vna"] button.send-now').click()
                dialog = wait(browser, lambda d: d.switch_to.alert, "the send-now confirmation")
                assert dialog.text.startswith("Send now to vna?") and "audit trail" in dialog.text
                return dialog

            send_now_dialog().dismiss()
            assert not [e for e in spool.audit_events() if e["action"] == "send_now"]   # cancelled: nothing done
            send_now_dialog().accept()
            message = browser.find_element(By.ID, "message")
            wait(browser, lambda d: "Send now to vna: backoff ended" in message.text, "the send-now message")
            assert "1 object waiting for a retry is due now" in message.text and "{" not in message.text
            assert [e["why"] for e in spool.audit_events() if e["action"] == "send_now"] == ["dashboard"]
    finally:
        spool.close()


def enter_token(browser: Any, value: str) -> None:
    from selenium.webdriver.common.by import By
    box = browser.find_element(By.ID, "token")
    box.clear()
    box.send_keys(value)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", box)


def loaded(browser: Any) -> None:
    wait(browser, lambda d: d.execute_script("return document.body.dataset.loaded") == "1", "the first data")


# Every element outside a scrolling box must lie within the viewport; the scrolling boxes too.
OVERFLOW_JS = """
const w = document.documentElement.clientWidth, bad = [];
for (const e of document.querySelectorAll("body *")) {
  if (e.closest("dialog, script") || (e.parentElement.closest(".scroll"))) continue;
  const r = e.getBoundingClientRect();
  if (r.width && (r.right > w + 0.5 || r.left < -0.5))
    bad.push(`${e.tagName}#${e.id}.${e.className} ${Math.round(r.left)}..${Math.round(r.right)}`);
}
return [w, document.documentElement.scrollWidth, bad];
"""


def set_width(browser: Any, width: int) -> None:
    """Resize the window; where the platform keeps a minimum window width, emulate the viewport."""
    browser.set_window_size(width, 900)
    if browser.execute_script("return window.innerWidth") != width:
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False})
    wait(browser, lambda d: d.execute_script("return window.innerWidth") == width, f"a {width} px viewport")


@pytest.mark.parametrize("width", [390, 768])
def test_dashboard_fits_narrow_screens(tmp_path: Path, browser: Any, width: int) -> None:
    """Phone and tablet widths: nothing wider than the viewport; at 390 px the destinations reflow
    into labelled blocks with their actions on screen; a migration job with a failed study too."""
    from selenium.webdriver.common.by import By

    cfg, path = make_config(tmp_path)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    try:
        fill(spool, time.time() - AGE)
        add_migration(spool)
        with LiveServer(cfg, spool, str(path)) as server:
            set_width(browser, width)
            browser.get(server.url + "/")
            enter_token(browser, "s3cret")
            loaded(browser)
            browser.get(f"{server.url}/#/study/{STUDY_A}")
            wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#search-results .study"), "the study")
            browser.find_element(By.CSS_SELECTOR, "details.series summary").click()
            wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".object")) == 3, "its instances")
            wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#migration-failures td.reason"),
                 "the migration's failed study")
            viewport, scroll_width, bad = browser.execute_script(OVERFLOW_JS)   # viewport less its scrollbar
            assert width - 20 <= viewport <= width and scroll_width <= viewport, (viewport, scroll_width)
            assert not bad, bad
            pause = browser.find_element(By.CSS_SELECTOR, 'tr[data-destination="pacs"] button.pause')
            rect = pause.rect
            assert pause.is_displayed() and rect["x"] >= 0 and rect["x"] + rect["width"] <= width
            if width == 390:   # reflowed: no header row, each cell labelled
                assert not browser.find_element(By.CSS_SELECTOR, "#destinations thead").is_displayed()
                pending = browser.find_element(By.CSS_SELECTOR, 'tr[data-destination="pacs"] td.pending')
                assert pending.get_attribute("data-label") == "pending" and pending.text == "2"
                studies = browser.find_element(By.CSS_SELECTOR, '#migrations tr[data-job="y2019"] td.studies')
                assert studies.get_attribute("data-label") == "studies" and studies.text == "2 / 4"
            job_pause = browser.find_element(By.CSS_SELECTOR, '#migrations tr[data-job="y2019"] button.pause')
            rect = job_pause.rect
            assert job_pause.is_displayed() and rect["x"] >= 0 and rect["x"] + rect["width"] <= width
    finally:
        spool.close()


def test_dashboard_greys_stale_numbers_and_keeps_history(tmp_path: Path, browser: Any) -> None:
    """The API going away greys the last numbers under a dated note; coming back (a fresh http
    process, empty server history) clears it and the chart keeps the points the tab had seen."""
    from selenium.webdriver.common.by import By

    cfg, path = make_config(tmp_path)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    try:
        fill(spool, time.time() - AGE)
        with LiveServer(cfg, spool, str(path)) as server:
            browser.get(server.url + "/")
            enter_token(browser, "s3cret")
            loaded(browser)

            def points() -> int:
                return int(browser.find_element(By.ID, "chart").get_attribute("data-points") or 0)

            def first() -> str:
                return str(browser.find_element(By.ID, "chart").get_attribute("data-first"))
            wait(browser, lambda d: points() >= 3, "three throughput points")
            oldest = first()
            browser.refresh()   # the server's history: drawn again at once
            loaded(browser)
            assert points() >= 3 and first() == oldest

            opacity = "return getComputedStyle(document.getElementById('destinations')).opacity"
            assert float(browser.execute_script(opacity)) == 1.0
            server.stop()
            note = browser.find_element(By.ID, "stale")
            wait(browser, lambda d: note.is_displayed(), "the unreachable note")
            assert note.text.startswith("Router unreachable since ") and "out of date" in note.text
            assert float(browser.execute_script(opacity)) < 0.6   # the last numbers, greyed
            assert browser.find_element(By.CSS_SELECTOR, 'tr[data-destination="pacs"] td.pending').text == "2"

            server.start()   # a fresh app: its ThroughputHistory starts empty
            wait(browser, lambda d: not note.is_displayed(), "the note cleared", timeout=15)
            assert float(browser.execute_script(opacity)) == 1.0
            assert first() == oldest   # kept in sessionStorage across the http restart
    finally:
        spool.close()


def test_large_study_rolls_up_and_opens_from_its_link(tmp_path: Path, browser: Any) -> None:
    """50 instances in two series: a few lines tall, counts per series and destination, every
    instance still one click away; #/study/UID opens it directly."""
    from selenium.webdriver.common.by import By

    from test_ops import incoming

    study = "1.2.826.0.1.3680043.10.50"
    cfg, path = make_config(tmp_path)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    try:
        objs = []
        for i in range(50):
            o = incoming(f"{study}.{i}", study, ("pacs", "vna"))
            o.meta["series_instance_uid"] = f"{study}.{1 if i < 30 else 2}"
            objs.append(o)
        oids = [r.oid for r in spool.put_many(objs, now=time.time() - AGE)]   # type: ignore[union-attr]
        claimed, _ = spool.claim("pacs", 50)
        spool.settle("pacs", [Outcome(c.oid, OutcomeKind.FAILED if c.oid in oids[:2] else OutcomeKind.DELIVERED,
                                      status=0xA900 if c.oid in oids[:2] else 0) for c in claimed])
        with LiveServer(cfg, spool, str(path)) as server:
            browser.get(server.url + "/")
            enter_token(browser, "s3cret")
            loaded(browser)
            browser.get(f"{server.url}/#/study/{study}")
            wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#search-results .study"), "the study")
            box = browser.find_element(By.CSS_SELECTOR, "#search-results .study")
            assert box.size["height"] < 1500, box.size
            assert rollup(box, "pacs") == {"routed": "50", "delivered": "48", "waiting": "0", "failed": "2",
                                           "dropped": "0"}
            assert rollup(box, "vna")["waiting"] == "50"
            series = {s.get_attribute("data-series"): s for s in box.find_elements(By.CSS_SELECTOR, "details.series")}
            assert list(series) == [f"{study}.1", f"{study}.2"]
            first = series[f"{study}.1"].find_element(By.TAG_NAME, "summary").text
            assert "30 instances" in first and "28 delivered" in first and "2 failed" in first
            assert "20 instances" in series[f"{study}.2"].text and "20 delivered" in series[f"{study}.2"].text
            assert box.find_element(By.CSS_SELECTOR, "a.share").get_attribute("href").endswith(f"#/study/{study}")
            series[f"{study}.2"].find_element(By.TAG_NAME, "summary").click()
            wait(browser, lambda d: len(series[f"{study}.2"].find_elements(By.CSS_SELECTOR, ".object")) == 20,
                 "the second series' 20 instances")
            one = series[f"{study}.2"].find_elements(By.CSS_SELECTOR, ".object")[0]
            assert one.get_attribute("data-sop") == f"{study}.30" and "from CT1" in one.text
    finally:
        spool.close()


def test_purge_asks_in_words_and_answers_in_words(tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    cfg, path = make_config(tmp_path)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    try:
        fill(spool, time.time() - AGE)
        with LiveServer(cfg, spool, str(path)) as server:
            browser.get(server.url + "/")
            enter_token(browser, "s3cret")
            loaded(browser)
            browser.find_element(By.CSS_SELECTOR, 'tr[data-destination="pacs"] button.purge').click()
            dialog = browser.find_element(By.ID, "purge-dialog")
            wait(browser, lambda d: dialog.is_displayed(), "the purge dialog")
            assert "for good" in dialog.text and "pacs" in dialog.text
            boxes = {b.get_attribute("value"): b for b in dialog.find_elements(By.NAME, "state")}
            assert boxes["failed"].is_selected() and not boxes["pending"].is_selected()   # the safe default
            assert "1 failed object" in dialog.text and "2 pending objects" in dialog.text
            browser.find_element(By.ID, "purge-confirm").click()   # no reason yet: refused in the dialog
            assert dialog.is_displayed() and spool.entry("pacs", 2) is not None
            browser.find_element(By.ID, "purge-reason").send_keys("sent again by the modality")
            browser.find_element(By.ID, "purge-confirm").click()
            message = browser.find_element(By.ID, "message")
            wait(browser, lambda d: message.is_displayed() and "removed" in message.text, "the purge result")
            assert message.text == ("1 object removed from pacs (failed) for good; recorded in the audit trail "
                                    "with the reason “sent again by the modality”.")
            wait(browser, lambda d: d.find_element(
                By.CSS_SELECTOR, 'tr[data-destination="pacs"] td.failed').text == "0", "pacs with no failed")
            purges = [e for e in audit_events(spool) if e.get("action") == "purge"]
            assert len(purges) == 1 and purges[0]["why"] == "sent again by the modality", purges
    finally:
        spool.close()


def test_migrations_view_progress_failures_pause_resume(tmp_path: Path, browser: Any) -> None:
    """Issue 13: the migrations card appears with a job: progress, rate, ETA, the failed studies
    with their reasons, and pause/resume that act on the job (audited) and answer in words."""
    from selenium.webdriver.common.by import By

    cfg, path = make_config(tmp_path, sources=True)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    try:
        fill(spool, time.time() - AGE)
        with LiveServer(cfg, spool, str(path)) as server:
            browser.get(server.url + "/")
            enter_token(browser, "s3cret")
            loaded(browser)
            card = browser.find_element(By.ID, "migrations-card")
            assert not card.is_displayed()                       # no job: no empty card

            jobs = add_migration(spool)

            def cell(col: str) -> str:
                found = browser.find_elements(By.CSS_SELECTOR, f'#migrations tr[data-job="y2019"] td.{col}')
                return str(found[0].text) if found else ""

            wait(browser, lambda d: card.is_displayed() and cell("studies") == "2 / 4", "the job's row")
            assert "running" in cell("state") and cell("failed-count") == "1"
            jobs.set_error("y2019", "OLDPACS refused the C-MOVE with 0xA801: register AE FASTROUTE there")
            wait(browser, lambda d: "register AE FASTROUTE there" in cell("state"), "the job's error under its state")
            assert "1 of 1 instances received, 1 delivered" in cell("progress") and "oldpacs → pacs" in cell("name")
            bar = browser.find_element(By.CSS_SELECTOR, '#migrations tr[data-job="y2019"] .bar > div')
            assert bar.get_attribute("style").replace(" ", "") == "width:50%;"      # 2 of 4 studies final
            failures = browser.find_element(By.CSS_SELECTOR, '#migration-failures [data-job="y2019"]')
            assert "y2019: 1 failed study" in failures.text
            row = failures.find_element(By.CSS_SELECTOR, f'tr[data-study="{STUDY_A}.1"]')
            assert "register FASTROUTE as a move destination at OLDPACS" in row.find_element(
                By.CSS_SELECTOR, "td.reason").text

            browser.find_element(By.CSS_SELECTOR, '#migrations tr[data-job="y2019"] button.pause').click()
            wait(browser, lambda d: jobs.state("y2019") == "paused", "the job paused")
            message = browser.find_element(By.ID, "message")
            wait(browser, lambda d: "Migration y2019 paused" in message.text, "the pause message")
            wait(browser, lambda d: "paused" in cell("state") and browser.find_elements(
                By.CSS_SELECTOR, '#migrations tr[data-job="y2019"] button.resume'), "the resume button")
            browser.find_element(By.CSS_SELECTOR, '#migrations tr[data-job="y2019"] button.resume').click()
            wait(browser, lambda d: jobs.state("y2019") == "running", "the job resumed")
            wait(browser, lambda d: message.text == "Migration y2019 resumed: running.", "the resume message")
            acts = [(e["action"], e["why"]) for e in audit_events(spool) if e["action"].startswith("migration_")]
            assert acts == [("migration_pause", "dashboard"), ("migration_resume", "dashboard")], acts
    finally:
        spool.close()


def add_migration(spool: Spool) -> Any:
    """Job y2019 as the runner leaves it: 4 studies, one verified, one failed with its reason."""
    from fastroute.spool.jobs import InstanceRecord, JobSpec, StudyRecord, StudyState

    jobs = spool.jobs
    jobs.create(JobSpec(name="y2019", source="oldpacs", destinations=("pacs",)))
    jobs.add_studies("y2019", [StudyRecord(seq=0, study_instance_uid=f"{STUDY_A}.{i}", patient_id=f"P{i}")
                               for i in range(4)])
    jobs.inventory_done("y2019")
    jobs.set_instances("y2019", f"{STUDY_A}.0", [InstanceRecord(f"{STUDY_A}.0.1")])
    jobs.mark_received("y2019", f"{STUDY_A}.0", {f"{STUDY_A}.0.1": 1})
    jobs.mark_delivered("y2019", f"{STUDY_A}.0", [f"{STUDY_A}.0.1"])
    jobs.mark_found("y2019", f"{STUDY_A}.0", [f"{STUDY_A}.0.1"])
    jobs.update_study("y2019", f"{STUDY_A}.0", state=StudyState.VERIFIED)
    jobs.update_study("y2019", f"{STUDY_A}.1", state=StudyState.FAILED,
                      reason="0xA801: register FASTROUTE as a move destination at OLDPACS")
    return jobs


def test_login_shows_the_user_and_hides_what_the_role_cannot_do(tmp_path: Path, browser: Any) -> None:
    """Issue 14: log in with a personal token (kept in sessionStorage for the tab), see who and which
    role, and only the actions that role may do."""
    from selenium.webdriver.common.by import By

    from fastroute.config import load
    from fastroute.ops.auth import hash_token
    from test_ops import config_text

    tokens = {"vera": "frt_dash-viewer-0123456789abcdef", "otto": "frt_dash-operator-0123456789abcdef"}
    roles = {"vera": "viewer", "otto": "operator"}
    users = "".join(f"    {n}: {{role: {roles[n]}, token_hash: \"{hash_token(t)}\"}}\n" for n, t in tokens.items())
    path = tmp_path / "router.yaml"
    path.write_text(config_text(tmp_path / "spool", token=None).replace(
        "http: {host: 127.0.0.1}\n", f"http:\n  users:\n{users}"))
    cfg = load(path)
    spool = Spool(cfg.spool, map_size=cfg.spool_max_bytes)
    try:
        fill(spool, time.time() - AGE)
        with LiveServer(cfg, spool, str(path)) as server:
            browser.get(server.url + "/")
            who = browser.find_element(By.ID, "whoami")
            pause = 'tr[data-destination="pacs"] button.pause'
            assert who.text == "not logged in"
            enter_token(browser, tokens["vera"])
            wait(browser, lambda d: who.text == "vera (viewer)", "the viewer shown")
            wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-destination="pacs"]'), "the pacs row")
            assert "0xA900" in browser.find_element(By.CSS_SELECTOR, "#failures tbody").text   # may read
            assert browser.find_elements(By.CSS_SELECTOR, pause)                             # in the page,
            assert not browser.find_element(By.CSS_SELECTOR, pause).is_displayed()           # but hidden
            assert not any(b.is_displayed() for b in browser.find_elements(By.CSS_SELECTOR, "button.purge"))
            assert browser.execute_script("return sessionStorage.getItem('fastroute-token')") == tokens["vera"]
            assert browser.execute_script("return localStorage.length") == 0
            enter_token(browser, tokens["otto"])
            wait(browser, lambda d: who.text == "otto (operator)", "the operator shown")
            wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, pause).is_displayed(), "pause offered")
            browser.find_element(By.CSS_SELECTOR, pause).click()
            wait(browser, lambda d: spool.is_paused("pacs"), "pacs paused by otto")
            wait(browser, lambda d: [e["who"] for e in spool.audit_events() if e["action"] == "pause"] == ["otto"],
                 "the pause audited under otto's name")
            browser.find_element(By.ID, "logout").click()
            wait(browser, lambda d: who.text == "not logged in", "logged out")
            assert browser.execute_script("return sessionStorage.getItem('fastroute-token')") == ""
            assert not browser.find_element(By.ID, "logout").is_displayed()
            wait(browser, lambda d: "enter it in the token field" in d.find_element(By.ID, "auth").text,
                 "the token asked for again")
            enter_token(browser, "frt_wrong-token-0123456789")
            wait(browser, lambda d: who.text == "not logged in", "not logged in with a wrong token")
    finally:
        spool.close()
