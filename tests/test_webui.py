"""The operator web UI in a real browser: Playwright driving Debian's Chromium.

The worker is the real process with real QEMU guests (conftest); the
browser is ``/usr/bin/chromium``, headless, with the flags these machines
need. Screenshots of the dashboard, a VM page and a console go to
``tests/artifacts/`` (git-ignored) for a person to look at.
"""

from __future__ import annotations

import os
import pathlib
import re
import time

import pytest
import requests
from playwright.sync_api import expect, sync_playwright

pytestmark = pytest.mark.timeout(120)

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
ARTIFACTS = pathlib.Path(__file__).resolve().parent / "artifacts"
VIEWPORT = {"width": 1440, "height": 900}
TOKEN = "s3cret-api-token-for-tests"
# Pages refresh every 2 s; a busy build machine can take a few rounds.
expect.set_options(timeout=15_000)


@pytest.fixture(scope="module")
def browser():
    assert os.access(CHROMIUM, os.X_OK), (
        f"{CHROMIUM} is missing: `make deps` installs Debian's chromium")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS,
                                      headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (own cookies) whose page fails the test on
    a script error or on any dialog a page opens by itself (``alert``)."""
    context = browser.new_context(viewport=VIEWPORT)
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    pg.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"),
                               d.dismiss()))
    pg.set_default_timeout(20_000)
    yield pg
    context.close()
    assert not problems, problems


def no_reload_marker(pg) -> None:
    pg.evaluate("window.__sameDocument = 'yes'")


def same_document(pg) -> bool:
    return pg.evaluate("window.__sameDocument") == "yes"


def canvas_lit_pixels(pg) -> int:
    return pg.evaluate("""() => {
        const c = document.querySelector('#console-screen canvas');
        if (!c || !c.width || !c.height) return 0;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let lit = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] | d[i + 1] | d[i + 2]) lit++;
        return lit;
    }""")


def badge(row):
    return row.locator(".badge")


# -- the main flow ------------------------------------------------------------------

def storage_suggestions(page) -> list[str]:
    return page.locator("#storage-images option").evaluate_all(
        "els => els.map(e => e.value)")


def test_dashboard_start_console_suspend_resume_destroy(worker, page, cleanup):
    ARTIFACTS.mkdir(exist_ok=True)
    image = worker.image("idle", name="web-ui.img")
    page.goto(worker.url + "/")
    expect(page.locator("#capacity .cap")).to_have_count(3)
    no_reload_marker(page)

    # The image fields suggest what the storage roots hold.
    assert image in storage_suggestions(page)

    form = page.locator("#start-form")
    form.locator("input[name=name]").fill("ui-web-1")
    form.locator("input[name=cpu_count]").fill("1")
    form.locator("input[name=mem_size]").fill("32")
    form.locator("input[name=hda_image]").fill(image)
    form.locator("button[type=submit]").click()
    expect(page.locator(".toast").first).to_contain_text("accepted")

    row = page.locator("#vm-rows tr[data-uuid]", has_text="ui-web-1")
    expect(badge(row)).to_have_text("running", timeout=30_000)
    uuid = row.get_attribute("data-uuid")
    assert worker.status(uuid)["status"] == "running"
    assert same_document(page), "the table refreshed by reloading the page"
    expect(row.locator("td code").nth(1)).to_have_text(worker.status(uuid)["vnc"])
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    # The console: noVNC from /static/novnc/, QEMU's websocket, a password.
    row.locator("a[data-action=console]").click()
    page.wait_for_url(re.compile(rf"/webui/vm/{uuid}/console$"))
    expect(page.locator("#console-status")).to_have_attribute(
        "data-state", "connected", timeout=15_000)
    page.wait_for_function("""() => {
        const c = document.querySelector('#console-screen canvas');
        return c && c.width > 0 && c.height > 0;
    }""")
    deadline = time.monotonic() + 10
    while canvas_lit_pixels(page) < 100 and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert canvas_lit_pixels(page) >= 100, "the console canvas stayed black"
    page.screenshot(path=str(ARTIFACTS / "console.png"))

    # Suspend and resume with the row's buttons, without a reload.
    page.goto(worker.url + "/webui")
    no_reload_marker(page)
    row.locator("button", has_text="Suspend").click()
    expect(badge(row)).to_have_text("suspended")
    assert worker.status(uuid)["status"] == "suspended"
    row.locator("button", has_text="Resume").click()
    expect(badge(row)).to_have_text("running")
    assert worker.status(uuid)["status"] == "running"

    # Destroy asks first; cancelling leaves the VM alone.
    dialog = page.locator("#confirm-dialog")
    row.locator("button", has_text="Destroy").click()
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("ui-web-1")
    page.locator("#confirm-cancel").click()
    expect(dialog).to_be_hidden()
    page.wait_for_timeout(300)
    assert worker.status(uuid)["status"] == "running"
    row.locator("button", has_text="Destroy").click()
    page.locator("#confirm-ok").click()
    expect(badge(row)).to_have_text("destroyed")
    assert worker.status(uuid)["status"] == "destroyed"
    assert same_document(page)


def test_vm_page_shows_the_timeline_and_follows_it(worker, page, cleanup):
    image = worker.image("idle")
    uuid = worker.start_vm("ui-timeline", image)
    worker.wait_for(uuid, "running")
    worker.ok("suspend", uuid=uuid)
    page.goto(f"{worker.url}/webui/vm/{uuid}")
    assert image in storage_suggestions(page)
    timeline = page.locator("#timeline li")
    types = [t for t in timeline.evaluate_all("els => els.map(e => e.dataset.type)")]
    assert types[0] == "accepted" and "spawned" in types
    assert types[-2:] == ["running", "suspended"]
    times = page.locator("#timeline time").all_inner_texts()
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}", t)
               for t in times), times
    expect(page.locator("#qemu-log")).to_contain_text("VNC server running")
    expect(page.locator(".vm-head .badge")).to_have_text("suspended")
    no_reload_marker(page)

    # What happens elsewhere shows up without a reload.
    worker.ok("resume", uuid=uuid)
    expect(page.locator("#timeline li").last).to_have_attribute(
        "data-type", "resumed")
    expect(page.locator(".vm-head .badge")).to_have_text("running")
    assert same_document(page)

    # The modify form changes a save target.
    target = str(worker.storage / "ui-timeline-saved.img")
    page.locator("#save-form input[name=hda_save_to]").fill(target)
    page.locator("#save-form button[type=submit]").click()
    expect(page.locator("#save-form input[name=hda_save_to]")).to_have_value(target)
    assert worker.status(uuid)["hda_save_to"] == target
    page.screenshot(path=str(ARTIFACTS / "vm-page.png"), full_page=True)


def test_markup_in_soft_list_and_uris_renders_as_text(worker, page, cleanup):
    soft = "<script>window.__xss = 1</script><img src=x onerror='window.__xss = 2'>"
    target = "http://127.0.0.1:9/<script>window.__xss=3</script>.img"
    uuid = worker.start_vm("ui-markup", worker.image("idle"), run_agent="false",
                           soft_list=soft, hda_save_to=target)
    worker.wait_for(uuid, "running")
    page.goto(f"{worker.url}/webui/vm/{uuid}")
    params = page.locator("dl.params")
    expect(params).to_contain_text(soft)
    expect(page.locator("#save-form input[name=hda_save_to]")).to_have_value(target)
    expect(page.locator("#timeline")).to_contain_text(soft)
    assert page.evaluate("window.__xss") is None
    assert page.locator("dl.params script, dl.params img, #timeline img").count() == 0

    page.goto(worker.url + "/webui")
    row = page.locator("#vm-rows tr[data-uuid]", has_text="ui-markup")
    expect(row).to_have_attribute("data-sig", re.compile("."))  # rebuilt by the script
    assert page.evaluate("window.__xss") is None


def test_state_changing_posts_need_the_csrf_token(worker, page, cleanup):
    uuid = worker.start_vm("ui-csrf", worker.image("idle"))
    worker.wait_for(uuid, "running")
    page.goto(worker.url + "/webui")
    # The page's own origin, the page's cookie, but no token: refused.
    status = page.evaluate("""uuid => fetch('/webui/do/suspend', {
            method: 'POST', body: new URLSearchParams({uuid}),
            headers: {'Accept': 'application/json'}}).then(r => r.status)""", uuid)
    assert status == 403
    assert worker.status(uuid)["status"] == "running"

    # The same without a browser: no token, a wrong one, another session's.
    ours = requests.Session()
    theirs = requests.Session()
    csrf = {}
    for name, session in (("ours", ours), ("theirs", theirs)):
        html = session.get(worker.url + "/webui", timeout=10).text
        csrf[name] = re.search(r'name="csrf-token" content="([^"]+)"', html)[1]
    url = worker.url + "/webui/do/suspend"
    for form in ({"uuid": uuid}, {"uuid": uuid, "csrf_token": "x" * 43},
                 {"uuid": uuid, "csrf_token": csrf["theirs"]}):
        resp = ours.post(url, data=form, headers={"Accept": "application/json"},
                         timeout=10)
        assert resp.status_code == 403, form
        assert "CSRF" in resp.json()["message"]
    assert ours.get(url, params={"uuid": uuid, "csrf_token": csrf["ours"]},
                    timeout=10).status_code == 405
    assert worker.status(uuid)["status"] == "running"
    resp = ours.post(url, data={"uuid": uuid, "csrf_token": csrf["ours"]},
                     headers={"Accept": "application/json"}, timeout=10)
    assert resp.status_code == 200 and resp.json()["status"] == "suspended"
    # Without JavaScript the form answers with a redirect and a message.
    resp = ours.post(worker.url + "/webui/do/resume",
                     data={"uuid": uuid, "csrf_token": csrf["ours"],
                           "back": "https://evil.example/"},
                     allow_redirects=False, timeout=10)
    assert resp.status_code == 303
    assert resp.headers["Location"].endswith("/webui")
    assert worker.status(uuid)["status"] == "running"


def test_api_token_guards_pages_behind_a_login_cookie(make_worker, page):
    w = make_worker(f"api_token = {TOKEN!r}\n")
    w.start()
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    # Programs: the header, as before; the cookie is no substitute for
    # state-changing API calls.
    assert requests.get(w.url + "/vmachines/list", timeout=10).status_code == 401
    assert requests.get(w.url + "/vmachines/list", headers=bearer,
                        timeout=10).status_code == 200
    resp = requests.get(w.url + "/webui", allow_redirects=False, timeout=10)
    assert resp.status_code == 303 and "/webui/login" in resp.headers["Location"]

    page.goto(w.url + "/webui")
    expect(page.locator("h2")).to_have_text("Log in to this worker")
    page.locator("input[name=token]").fill("wrong")
    page.locator("form button[type=submit]").click()
    expect(page.locator(".flash.error")).to_contain_text("not this worker's API token")
    page.locator("input[name=token]").fill(TOKEN)
    page.locator("form button[type=submit]").click()
    page.wait_for_url(w.url + "/webui")
    expect(page.locator("#live-state")).to_have_attribute("data-state", "ok")
    cookie = next(c for c in page.context.cookies()
                  if c["name"] == "vmworker_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    assert page.evaluate("document.cookie") == ""
    # The login cookie reads the list but cannot call the API's state changes.
    jar = {"vmworker_session": cookie["value"]}
    assert requests.get(w.url + "/vmachines/list", cookies=jar,
                        timeout=10).status_code == 200
    assert requests.get(w.url + "/vmachines/destroy", params={"name": "x"},
                        cookies=jar, timeout=10).status_code == 401
    page.locator("header form button", has_text="Log out").click()
    page.wait_for_url(re.compile(r"/webui/login"))
    page.goto(w.url + "/webui")
    expect(page.locator("h2")).to_have_text("Log in to this worker")


# -- pieces without a browser ---------------------------------------------------------

def test_timeline_index_reads_appends_torn_tails_and_compactions(tmp_path):
    from vmworker.journal import Journal, frame
    from vmworker.timeline import JournalIndex

    journal = Journal(str(tmp_path))
    journal.replay()
    index = JournalIndex(journal.path)
    assert index.events("a") == ([], "")
    for i, (uuid, etype) in enumerate([("a", "accepted"), ("b", "accepted"),
                                       ("a", "running")]):
        journal.append({"type": etype, "uuid": uuid, "ts": float(i)})
    assert [e["type"] for e in index.events("a")[0]] == ["accepted", "running"]
    # A record still being written is not shown, then shown once whole.
    whole = frame({"type": "suspended", "uuid": "a", "ts": 3.0})
    with open(journal.path, "ab") as f:
        f.write(whole[:10])
        f.flush()
        assert [e["type"] for e in index.events("a")[0]][-1] == "running"
        f.write(whole[10:])
    assert [e["type"] for e in index.events("a")[0]][-1] == "suspended"
    # Compaction renames a new file over the old one: the index starts again.
    journal.rewrite([{"type": "snapshot", "uuid": "a", "ts": 4.0,
                      "record": {"status": "suspended"}}])
    assert [e["type"] for e in index.events("a")[0]] == ["snapshot"]
    assert index.events("b") == ([], "")
    index.close()
    journal.close()


@pytest.mark.parametrize("url, expected", [
    ("/webui/vm/x", "/webui/vm/x"), ("", "/webui"), ("//evil.example/", "/webui"),
    ("https://evil.example/", "/webui"), ("/\\evil.example", "/webui"),
    ("/webui\r\nSet-Cookie: a=b", "/webui"), ("webui", "/webui")])
def test_redirect_targets_stay_on_the_worker(url, expected):
    from vmworker.webui import local_target
    assert local_target(url) == expected
