"""`dromedary serve`'s chat page in a real browser: headless Chromium (Debian's chromium and
chromium-driver, which scripts/install.sh installs) driven by Selenium, against a live server on the
embedded default model. Every answer the page shows is checked against the same conversation sent
to the server with the openai client; the downloaded transcript against chat's /save format.

Skips only when no browser is installed. A screenshot of the conversation is written under the
test's temporary folder (its path is printed) for CI to keep."""

from __future__ import annotations

import json
import shutil
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers_ckpt import REPO
from test_serve import ENDLESS, KEY, start_server, stop_server

from dromedary import records
from dromedary.engine import chat_page
from dromedary.recipe import templates

MODEL = "dromedary-default"


def _browser() -> tuple[str, str]:
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no headless browser: install chromium and chromium-driver (scripts/install.sh does, as root)")
    return binary, driver


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from dromedary.default_model import ensure_default_model

    ensure_default_model()
    live = start_server(tmp_path_factory.mktemp("chat-page"))
    live.base = live.url.removesuffix("/v1")
    yield live
    stop_server(live)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def driver(downloads):
    binary, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    # An explicit driver: Selenium Manager would otherwise try to download one.
    d = webdriver.Chrome(options=options, service=Service(driver_path))
    d.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield d
    d.quit()


# ---------------------------------------------------------------------------------------------
# Driving the page
# ---------------------------------------------------------------------------------------------


def wait(d, cond, what: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(d, timeout, poll_frequency=0.05).until(lambda d: cond(d), message=what)


def shown(d) -> list[dict]:
    """The conversation as the page shows it: each message's kind, text and status line."""
    return d.execute_script("""
        return [...document.querySelectorAll('#conversation .msg')].map(m => ({
          kind: [...m.classList].filter(c => c !== 'msg').join(' '),
          text: m.querySelector('.text').textContent,
          status: (m.querySelector('.status') || {textContent: ''}).textContent}));""")


def idle(d) -> bool:
    return d.find_element("id", "send").is_enabled() and not d.find_element("id", "stop").is_enabled()


def set_field(d, field: str, value) -> None:
    from selenium.webdriver.common.keys import Keys

    el = d.find_element("id", field)
    el.clear()
    el.send_keys(str(value), Keys.TAB)  # TAB: the change event fires on leaving the field


def send(d, text: str, wait_done: bool = True) -> None:
    # Set as a value, not typed: send_keys would press Enter (which sends) at each newline.
    d.execute_script("document.getElementById('message').value = arguments[0];", text)
    d.find_element("id", "send").click()
    if wait_done:
        wait(d, idle, "the answer finished")


def choose_system(d, name: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(d.find_element("id", "system")).select_by_value(name)


def download(d, folder: Path) -> list[str]:
    before = set(folder.glob("*.jsonl"))
    d.find_element("id", "download").click()
    new = wait(d, lambda _: [p for p in folder.glob("*.jsonl") if p not in before], "the transcript was downloaded", 30)
    path = new[0]
    time.sleep(0.2)  # Chrome renames the .crdownload into place; the content is complete by then
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def reference(live, messages: list[dict], max_tokens: int) -> str:
    reply = live.client().chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens)
    return reply.choices[0].message.content


def check_transcript(lines: list[str], want: list[dict], folder: Path) -> None:
    """chat's /save format: {"id", "role", "content"} per line, ids 0.. with the system prompt first,
    each line as json.dumps writes it; and the stages' reader accepts the file."""
    expected = [{"id": str(i), "role": r["role"], "content": r["content"]} for i, r in enumerate(want)]
    assert [json.loads(line) for line in lines] == expected
    assert lines == [json.dumps(r, ensure_ascii=False) + "\n" for r in expected]
    path = folder / "check.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    assert records.read_records(path, ("id", "role", "content")) == expected


# ---------------------------------------------------------------------------------------------
# Without a browser
# ---------------------------------------------------------------------------------------------


def test_page_and_info_endpoint(live):
    with urllib.request.urlopen(live.base + "/", timeout=30) as r:  # the page itself needs no key
        assert r.status == 200 and r.headers["Content-Type"] == "text/html; charset=utf-8"
        csp = r.headers["Content-Security-Policy"]
        html = r.read().decode()
    assert html == chat_page.PAGE.read_text(encoding="utf-8")
    assert "script-src 'sha256-" in csp and "connect-src 'self'" in csp
    assert "http://" not in html and "https://" not in html  # nothing is loaded from elsewhere
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html and "document.write" not in html

    status, body = live.raw("GET", "/v1/dromedary/info", key="wrong")
    assert status == 401
    status, info = live.raw("GET", "/v1/dromedary/info")
    assert status == 200
    assert info["model"] == MODEL and info["adapter"] is None and info["system"] == "standard"
    assert info["assistant_name"] == templates.DEFAULT_ASSISTANT_NAME
    assert info["system_prompts"] == {n: templates.load_system_prompt(n) for n in templates.SYSTEM_PROMPT_NAMES}


def test_the_page_ships_as_package_data():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    engine = REPO / "dromedary" / "engine"
    shipped = {p for pattern in data["dromedary.engine"] for p in engine.glob(pattern)}
    assert chat_page.PAGE in shipped


# ---------------------------------------------------------------------------------------------
# In the browser
# ---------------------------------------------------------------------------------------------


def test_a_conversation_in_the_browser(live, driver, downloads, tmp_path):
    d = driver
    d.get(live.base + "/")
    served = d.find_element("id", "served")
    wait(d, lambda _: "API key" in served.text, "the page says the server asks for a key")

    # A request that fails (no key yet): the error is in the conversation, the message is kept.
    send(d, "Hello")
    assert shown(d)[-1]["kind"] == "error" and "API key" in shown(d)[-1]["text"]
    assert d.find_element("id", "message").get_attribute("value") == "Hello"

    # With the key, the page states what is served.
    set_field(d, "api-key", KEY)
    wait(d, lambda _: "Model dromedary-default" in served.text, "the page names the model")
    assert "adapter none" in served.text and "embedded default" in served.text

    # The server refuses the request (max tokens past the window): shown, and the page goes on.
    set_field(d, "temperature", 0)
    set_field(d, "max-tokens", 100000)
    send(d, "Hi")
    last = shown(d)[-2:]
    assert last[0]["kind"] == "user dropped" and "left out" in last[0]["status"]
    assert last[1]["kind"] == "error" and "context window" in last[1]["text"]

    # A long answer streams: the text grows while it is generated; Stop ends it and frees the slot.
    set_field(d, "max-tokens", 6000)
    d.execute_script("""
        window.lengths = [];
        new MutationObserver(() => {
          const m = document.querySelector('#conversation .msg.assistant:last-child .text');
          if (m) window.lengths.push(m.textContent.length);
        }).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});""")
    before = live.health()
    send(d, ENDLESS, wait_done=False)
    reply_len = lambda d: d.execute_script("return (window.lengths || []).slice(-1)[0] || 0")
    wait(d, lambda d: reply_len(d) >= 40, "the answer streams")
    assert d.find_element("id", "stop").is_enabled()
    grown = reply_len(d)
    wait(d, lambda d: reply_len(d) > grown, "the answer keeps growing")
    assert live.health()["active"] == 1
    d.find_element("id", "stop").click()
    wait(d, idle, "the page is idle after Stop")
    wait(d, lambda _: live.health()["cancelled"] == before["cancelled"] + 1, "the server cancelled the row", 10)
    assert live.health()["active"] == 0 and live.health()["finished"] == before["finished"]
    lengths = d.execute_script("return window.lengths")
    assert len(set(lengths)) >= 5 and lengths == sorted(lengths)  # many renders, each longer
    stopped = shown(d)[-1]
    assert stopped["kind"] == "assistant" and stopped["status"] == "stopped" and stopped["text"]
    partial = stopped["text"]

    # A second turn sends the whole conversation; markup typed by the user stays text.
    standard = templates.load_system_prompt("standard")
    second = 'Who are you? <b>bold</b> <img src=x onerror="window.pwned=1"> <script>window.pwned=2</script>'
    set_field(d, "max-tokens", 16)
    send(d, second)
    convo = [{"role": "system", "content": standard}, {"role": "user", "content": ENDLESS},
             {"role": "assistant", "content": partial}, {"role": "user", "content": second}]
    user, answer = shown(d)[-2:]
    assert user == {"kind": "user", "text": second, "status": ""}
    assert answer["kind"] == "assistant" and answer["text"] == reference(live, convo, 16) != ""
    convo.append({"role": "assistant", "content": answer["text"]})
    assert d.execute_script("return document.querySelector('#conversation b, #conversation img, "
                            "#conversation script') === null && window.pwned === undefined")

    # Switching the system prompt keeps the conversation; the transcript has the new one.
    choose_system(d, "concise")
    assert "concise" in shown(d)[-1]["text"] and shown(d)[-1]["kind"] == "note"
    concise = templates.load_system_prompt("concise")
    assert d.find_element("id", "system-text").get_attribute("textContent") == concise
    check_transcript(download(d, downloads), [{"role": "system", "content": concise}, *convo[1:]], tmp_path)

    shot = tmp_path / "chat.png"
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 0
    print(f"screenshot of the chat page: {shot}")

    # Reset forgets the turns; a custom system prompt is sent as the request's own.
    d.find_element("id", "reset").click()
    assert [m["kind"] for m in shown(d)] == ["note"]
    assert not d.find_element("id", "custom-system").is_displayed()
    choose_system(d, "custom")
    assert d.find_element("id", "custom-system").is_displayed()
    custom = "You are a camel. Answer in one word."
    d.find_element("id", "custom-system").send_keys(custom)
    set_field(d, "max-tokens", 8)
    send(d, "Hello")
    answer = shown(d)[-1]
    convo = [{"role": "system", "content": custom}, {"role": "user", "content": "Hello"}]
    assert answer["kind"] == "assistant" and answer["text"] == reference(live, convo, 8) != ""
    check_transcript(download(d, downloads), [*convo, {"role": "assistant", "content": answer["text"]}], tmp_path)
    assert live.health()["active"] == 0


def test_model_markup_is_shown_as_text(live, driver):
    """The reply is replaced, in the page's own fetch, by markup a model could write: it must come
    out as the same characters, with no element made and no script run."""
    d = driver
    d.get(live.base + "/")  # the key is kept for the tab (sessionStorage)
    wait(d, lambda d: "Model dromedary-default" in d.find_element("id", "served").text, "the page names the model")
    markup = ['<script>window.pwned=1</script>', '<img src=x onerror="window.pwned=2"><b>bold</b>',
              ' &amp; <a href="javascript:window.pwned=3">link</a>']
    d.execute_script("""
        const parts = arguments[0], real = window.fetch;
        window.fetch = async (url, opts) => {
          if (!String(url).endsWith('/v1/chat/completions')) return real(url, opts);
          const chunks = [{choices: [{index: 0, delta: {role: 'assistant', content: ''}, finish_reason: null}]},
                          ...parts.map(p => ({choices: [{index: 0, delta: {content: p}, finish_reason: null}]})),
                          {choices: [{index: 0, delta: {}, finish_reason: 'stop'}]}];
          const body = chunks.map(c => 'data: ' + JSON.stringify(c) + '\\r\\n\\r\\n').join('') + 'data: [DONE]\\n\\n';
          return new Response(body, {headers: {'Content-Type': 'text/event-stream'}});
        };""", markup)
    send(d, "Write some HTML")
    answer = shown(d)[-1]
    assert answer == {"kind": "assistant", "text": "".join(markup), "status": ""}
    assert d.execute_script("return document.querySelector('#conversation script, #conversation img, "
                            "#conversation b, #conversation a') === null && window.pwned === undefined")
