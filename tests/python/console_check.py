"""The web console driven in a real headless Chromium (Debian's, through
Playwright) against the real gateway: an operator's whole first session,
then a user's self-service view. Each step is a check; they run in order
and share the browser. Screenshots of every page go to SHOTS_DIR."""

import os
import re
import time

from openai import OpenAI
from playwright.sync_api import expect, sync_playwright

from checks import check, run

BASE = os.environ["WASMGATE_URL"]
ADMIN = os.environ["WASMGATE_ADMIN"]
MOCK = os.environ["MOCK_URL"]
PLUGIN = os.environ["PLUGIN_FILE"]
SHOTS = os.environ["SHOTS_DIR"]
OTHER_TOKEN_NAME = os.environ["OTHER_TOKEN_NAME"]
SECRET = os.environ["UPSTREAM_SECRET"]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Chromium as root on a closed network: no sandbox, no background calls home.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pw = sync_playwright().start()
browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
context = browser.new_context(viewport={"width": 1366, "height": 900})
page = context.new_page()
page.set_default_timeout(15_000)
errors = []
page.on("pageerror", lambda e: errors.append(str(e)))
seen = []  # every page's HTML, checked for the upstream key at the end
state = {}


def shot(name):
    seen.append(page.content())
    page.screenshot(path=os.path.join(SHOTS, name + ".png"), full_page=True)


def goto(hash_):
    """Open a page afresh (a reload when it is the one shown)."""
    target = BASE + "/#/" + hash_
    if page.url == target:
        page.reload()
    else:
        page.goto(target)
    page.wait_for_selector("main h1")


def reload_until(hash_, selector, what, limit=30):
    """Reload a page until `selector` appears (the billing writer commits
    rows in batches); fail with `what` after `limit` seconds."""
    deadline = time.time() + limit
    while time.time() < deadline:
        goto(hash_)
        if page.locator(selector).count():
            return
        time.sleep(0.5)
    raise AssertionError(what)


@check
def a_wrong_token_is_refused_with_a_clear_message():
    page.goto(BASE + "/")
    page.fill("#token", "adm-wrong")
    page.click("button[type=submit]")
    expect(page.locator("[role=alert]")).to_contain_text("Wrong token")


@check
def the_admin_signs_in_and_sees_the_dashboard():
    page.fill("#token", ADMIN)
    page.click("button[type=submit]")
    expect(page.locator("[data-test=requests]")).to_be_visible()
    cookies = [c for c in context.cookies() if c["name"] == "wasmgate_session"]
    assert cookies and cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict", cookies
    assert page.evaluate("document.cookie") == "", "the session cookie is readable by scripts"


@check
def a_channel_is_created_from_the_form():
    goto("channels")
    page.click("text=New channel")
    form = page.locator("[data-test=channel-form]")
    form.locator("[name=name]").fill("browser-channel")
    form.locator("[name=adapter]").select_option("openai")
    form.locator("[name=base_url]").fill(MOCK)
    form.locator("[name=models]").fill("gpt-4o-mini, gpt-4o")
    form.locator("[name=key]").fill(SECRET)
    form.locator("button[type=submit]").click()
    row = page.locator("[data-test=channels] tr", has_text="browser-channel")
    expect(row).to_be_visible()
    expect(row.locator("[data-test=status]")).to_contain_text("enabled")


@check
def the_channel_is_tested_with_its_response_time():
    row = page.locator("[data-test=channels] tr", has_text="browser-channel")
    row.locator("[data-test=test]").click()
    expect(page.locator("[data-test=channel-notice]")).to_contain_text(re.compile(r"Test finished in \d+ ms"))
    page.click("[data-test=test-all]")
    expect(page.locator("[data-test=channel-notice]")).to_contain_text("2 of 2 channels answered")
    expect(row.locator("td").nth(8)).to_contain_text(re.compile(r"\d+ ms"))
    shot("channels")


@check
def a_user_and_a_key_are_created_and_the_key_is_shown_once():
    goto("users")
    form = page.locator("[data-test=user-form]")
    form.locator("[name=name]").fill("carol")
    form.locator("[name=quota]").fill("5000000")
    form.locator("button[type=submit]").click()
    row = page.locator("[data-test=users] tr", has_text="carol")
    expect(row).to_be_visible()
    state["user_id"] = row.get_attribute("data-id")
    row.locator("[data-test=topup]").click()
    page.fill("dialog [name=amount]", "250000")
    page.fill("dialog [name=note]", "welcome credit")
    page.click("dialog button[type=submit]")
    expect(page.locator("main [role=status]")).to_contain_text("Balance is now $10.50")
    shot("users")
    goto("tokens")
    form = page.locator("[data-test=token-form]")
    form.locator("[name=user_id]").fill(state["user_id"])
    form.locator("[name=name]").fill("carol-key")
    form.locator("button[type=submit]").click()
    try:
        key = page.locator("[data-test=key]").inner_text()
    except Exception:
        print("DEBUG", state, page.url, page.inner_text("main")[:1500])
        raise
    assert key.startswith("sk-") and len(key) >= 35, key
    state["key"] = key
    shot("tokens")
    goto("tokens")
    assert key not in page.content(), "the full key is shown again"


@check
def the_key_works_with_the_official_openai_sdk():
    client = OpenAI(base_url=BASE + "/v1", api_key=state["key"], max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi from the console test"}])
    assert reply.choices[0].message.content, reply


@check
def the_request_is_on_the_logs_page_with_its_detail():
    row = "[data-test=logs] tr:has-text('carol-key')"
    reload_until("logs", row, "the request never reached the logs page")
    page.locator(row).first.click()
    detail = page.locator("[data-test=log-detail]")
    expect(detail).to_contain_text('"token_name": "carol-key"')
    expect(detail).to_contain_text('"plugin": "openai"')
    shot("log-detail")
    page.keyboard.press("Escape")
    shot("logs")
    page.select_option("[data-test=log-filters] [name=type]", "topup")
    page.click("[data-test=log-filters] button[type=submit]")
    expect(page.locator("[data-test=logs] tr", has_text="welcome credit")).to_be_visible()


@check
def the_dashboard_counts_the_request():
    deadline = time.time() + 30
    while True:
        goto("dashboard")
        requests = int(re.sub(r"\D", "", page.locator("[data-test=requests]").inner_text()) or 0)
        tokens = int(re.sub(r"\D", "", page.locator("[data-test=tokens]").inner_text()) or 0)
        if requests >= 1 and tokens > 0:
            break
        assert time.time() < deadline, f"dashboard shows {requests} requests, {tokens} tokens"
        time.sleep(0.5)
    expect(page.locator("[data-test=health]")).to_contain_text("enabled")
    shot("dashboard")


@check
def a_plugin_is_uploaded_and_listed():
    goto("plugins")
    page.fill("#plugin-name", "uploaded-policy")
    page.set_input_files("[data-test=plugin-file]", PLUGIN)
    expect(page.locator("[data-test=plugin-notice]")).to_contain_text("uploaded-policy loaded")
    expect(page.locator("[data-test=plugin-notice]")).to_contain_text(re.compile(r"plugin check: (\d+) of \1 conformance checks passed"))
    expect(page.locator("[data-test=plugins] tr", has_text="uploaded-policy")).to_be_visible()
    expect(page.locator("[data-test=plugins] tr", has_text="openai")).to_contain_text("browser-channel")
    shot("plugins")


@check
def a_broken_plugin_is_rejected_with_the_reason():
    broken = os.path.join(SHOTS, "broken.wasm")
    with open(broken, "wb") as f:
        f.write(b"\0asm not really")
    page.fill("#plugin-name", "broken")
    page.set_input_files("[data-test=plugin-file]", broken)
    expect(page.locator("[data-test=plugin-notice]")).to_contain_text("Rejected")
    os.remove(broken)


@check
def the_channel_is_disabled_with_a_note_and_shows_it():
    goto("channels")
    row = page.locator("[data-test=channels] tr", has_text="browser-channel")
    row.locator("[data-test=toggle]").click()
    page.fill("[data-test=note]", "maintenance window")
    page.click("[data-test=confirm]")
    expect(page.locator("[data-test=channels] tr", has_text="browser-channel").locator("[data-test=status]")).to_contain_text("disabled by admin")


@check
def pricing_errors_are_shown_inline():
    goto("settings")
    pricing = page.locator("main form").first
    pricing.locator("textarea").fill('{"quota_per_dollar": -1}')
    pricing.locator("button[type=submit]").click()
    expect(page.locator("[role=alert]")).to_be_visible()
    shot("settings")


@check
def filter_rules_are_edited_and_validated_on_the_settings_page():
    goto("settings")
    filters = page.locator("main form").nth(2)
    filters.locator("textarea").fill('{"filters": [{"plugin": "block-list", "routes": ["chat"]}]}')
    filters.locator("button[type=submit]").click()
    expect(page.locator("[role=alert]")).to_contain_text("filters[0].routes")
    filters.locator("textarea").fill('{"filters": [{"plugin": "block-list", "models": ["gpt-4o*"], "settings": {"words": ["x"]}}]}')
    filters.locator("button[type=submit]").click()
    expect(filters.locator("textarea")).to_have_value(re.compile('"source": "api"'))
    filters.locator("button[type=button]").click()
    expect(filters.locator("textarea")).to_have_value(re.compile('"source": "config"'))


@check
def the_console_speaks_chinese_and_has_a_dark_mode():
    goto("channels")
    page.click("header button:has-text('中文')")
    expect(page.locator("nav")).to_contain_text("渠道")
    expect(page.locator("main h1")).to_have_text("渠道")
    page.click("header button:has-text('English')")
    expect(page.locator("nav")).to_contain_text("Channels")
    page.check("#dark")
    assert page.evaluate("document.documentElement.classList.contains('dark')")
    page.uncheck("#dark")


@check
def no_page_shows_an_upstream_key():
    for name in ["dashboard", "channels", "plugins", "users", "tokens", "logs", "settings"]:
        goto(name)
        page.wait_for_timeout(300)
        seen.append(page.content())
    leaked = [i for i, html in enumerate(seen) if SECRET in html]
    assert not leaked, f"the upstream key is on {len(leaked)} page(s)"


@check
def the_admin_signs_out():
    page.click("[data-test=signout]")
    expect(page.locator("#token")).to_be_visible()
    assert not [c for c in context.cookies() if c["name"] == "wasmgate_session" and c["value"]]


@check
def a_user_sees_only_their_own_account_and_logs():
    page.fill("#token", state["key"])
    page.click("button[type=submit]")
    expect(page.locator("[data-test=balance]")).to_be_visible()
    expect(page.locator("nav")).not_to_contain_text("Channels")
    shot("self-account")
    reload_until("mylogs", "[data-test=logs] tr:has-text('carol-key')", "the user's own request is not in their logs")
    text = page.locator("main").inner_text()
    assert OTHER_TOKEN_NAME not in text, "another user's rows are shown"
    tokens = page.locator("[data-test=logs] tbody tr td:nth-child(4)").all_inner_texts()
    # Their requests, and the top-up an admin gave them (no token).
    assert set(tokens) == {"carol-key", ""}, tokens
    assert "welcome credit" in text, "the user does not see their top-up"
    shot("self-logs")
    goto("mytokens")
    page.locator("[data-test=my-token-form] [name=name]").fill("carol-second")
    page.locator("[data-test=my-token-form] button[type=submit]").click()
    assert page.locator("[data-test=key]").inner_text().startswith("sk-")
    expect(page.locator("[data-test=tokens] tr", has_text="carol-second")).to_be_visible()
    shot("self-keys")
    # The admin API is closed to a user's session.
    status = page.evaluate("fetch('/api/users').then(r => r.status)")
    assert status == 403, status


@check
def no_script_error_happened():
    assert not errors, errors


try:
    run("console")
finally:
    browser.close()
    pw.stop()
