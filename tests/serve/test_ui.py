"""The web UI at /ui: key login, then in a real headless browser (Debian chromium driven by
Playwright): a bad upload shows its line-numbered errors, a good one its data check report,
a job started from the form succeeds with a live loss curve, the playground's base and
fine-tuned answers equal the API's, and the adapter download is the run's adapter. Screenshots
are saved (path printed; kept under LORAKIT_UI_SCREENSHOTS when set)."""

import io
import json
import os
import shutil
import zipfile

import httpx
import openai
import pytest
from service_helpers import bad_rows_text, running_service, sft_rows, write_jsonl

KEY = "sk-ui-test"


@pytest.fixture(scope="module")
def ui_service(serve_env, tmp_path_factory):
    # One row at a time, so the playground's two requests and the API calls the test compares
    # them with run the same forwards (batched-equals-alone is the engine's own test,
    # tests/serve/test_engine.py and tests/lora/test_inject.py).
    with running_service(serve_env["base_dir"], tmp_path_factory.mktemp("ui-state"),
                         api_key=KEY, max_batch_size=1) as running:
        yield running


def test_ui_needs_a_valid_key_and_keeps_a_session_in_a_strict_cookie(ui_service):
    url = ui_service["url"]
    page = httpx.get(url + "/ui")
    assert page.status_code == 401 and 'name="key"' in page.text
    assert httpx.get(url + "/ui/api/jobs/ftjob-x").status_code == 401
    origin = {"Origin": url}  # browsers send it with every POST; the UI requires it
    bad = httpx.post(url + "/ui/login", data={"key": "wrong"}, headers=origin)
    assert bad.status_code == 401 and "not valid" in bad.text
    good = httpx.post(url + "/ui/login", data={"key": KEY}, headers=origin)
    assert good.status_code == 303
    cookie = good.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = httpx.get(url + "/ui", cookies=good.cookies)
    assert page.status_code == 200 and "Upload a dataset" in page.text
    missing = httpx.get(url + "/ui/jobs/ftjob-nope", cookies=good.cookies)
    assert missing.status_code == 404


def _browser():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium is not installed (Debian package `chromium`; .ci/run "
                    "installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev)")
    return browser, sync_api


def test_browser_upload_train_watch_and_compare(ui_service, tmp_path):
    executable, sync_api = _browser()
    url = ui_service["url"]
    good = write_jsonl(tmp_path / "digits.jsonl", sft_rows(16))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(bad_rows_text())
    shots = os.environ.get("LORAKIT_UI_SCREENSHOTS")
    shot_dir = tmp_path / "screenshots"
    shot_dir.mkdir()
    problems = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable,
                                    args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 1400})
        # JS errors and failed scripts / styles / fetches (pages answered 401 / 400 on purpose
        # are documents: the login page and the refused upload)
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" and
                not m.text.startswith("Failed to load resource") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if
                r.status >= 400 and r.request.resource_type != "document" else None)
        page.set_default_timeout(60_000)

        page.goto(url + "/ui")
        page.fill("#key", KEY)
        page.click("#login")
        page.wait_for_selector("#upload-form")
        # a bad file: refused, the errors name the lines
        page.set_input_files("#file", str(bad))
        page.click("#upload")
        error = page.inner_text("#error")
        assert "bad.jsonl:2: prompt" in error and "bad.jsonl:3" in error
        # a good one: its data check report
        page.set_input_files("#file", str(good))
        page.click("#upload")
        page.wait_for_selector("#report")
        assert "16 examples" in page.inner_text("#report")
        page.screenshot(path=str(shot_dir / "1-data-check.png"), full_page=True)
        # start a job from the form
        page.goto(url + "/ui")
        page.fill("#n_epochs", "3")  # 16 examples pack into one row: 3 steps
        page.fill("#batch_size", "4")
        page.fill("#lr", "20")
        page.fill("#lora_r", "4")
        page.fill("#suffix", "ui")
        page.click("#start")
        page.wait_for_selector("#loss")
        job_id = page.url.rsplit("/", 1)[1]
        page.wait_for_function("document.getElementById('status').textContent === 'succeeded'",
                               timeout=240_000)
        page.wait_for_selector("svg#loss path.series", state="attached")
        assert page.locator("svg#loss circle.point").count() == 3  # one point per step
        page.wait_for_selector("#downloads:not([hidden])")
        page.screenshot(path=str(shot_dir / "2-job.png"), full_page=True)
        fine_tuned = page.inner_text("#model")
        assert fine_tuned.startswith("ft:tiny-base:ui:")
        # playground: the page asks for both models and shows what the server answered
        page.fill("#prompt", "Spell the digit 5 (5)")
        with page.expect_response(lambda r: r.url.endswith("/ui/api/playground")) as answered:
            page.click("#compare")
        page.wait_for_selector("#out-ft[data-done='1']")
        played = answered.value
        asked = json.loads(played.request.post_data)
        outputs = played.json()["outputs"]
        # textContent, the string the script wrote: innerText is the *rendered* text, which
        # can differ in leading / trailing newlines (the tiny model's answers are often "\n")
        shown = {"tiny-base": page.text_content("#out-base"), fine_tuned: page.text_content("#out-ft")}
        page.screenshot(path=str(shot_dir / "3-playground.png"), full_page=True)
        # the adapter download
        with page.expect_download() as download:
            page.click("#download-adapter")
        archive = open(download.value.path(), "rb").read()  # deleted with the browser
        browser.close()

    assert problems == [], problems
    assert asked["models"] == ["tiny-base", fine_tuned] and asked["prompt"] == "Spell the digit 5 (5)"
    for model, text in shown.items():
        assert text == outputs[model]["text"], (model, text, outputs[model])
    # each side is that model's greedy answer: the API's starts the same way. (Not compared
    # whole: in this service two identical greedy requests to the lr-20 tiny adapter have
    # differed near the end of their 48 tokens, 1 run in ~5 on an AVX512 CPU: an open engine
    # issue, named in issue 20's note, not the UI's.)
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    for model, text in shown.items():
        reply = client.chat.completions.create(
            model=model, max_tokens=48, temperature=0,
            messages=[{"role": "user", "content": "Spell the digit 5 (5)"}])
        content = reply.choices[0].message.content
        assert content.startswith(text[:24]) or content.strip().startswith(text[:24]), \
            (model, text, content)
    adapter = ui_service["manager"].root / "jobs" / job_id / "adapter"
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        assert zf.read("adapter/adapter_model.safetensors") == \
            (adapter / "adapter_model.safetensors").read_bytes()
    for shot in sorted(shot_dir.iterdir()):
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if shots:
        shutil.copytree(shot_dir, shots, dirs_exist_ok=True)
    print(f"screenshots: {shots or shot_dir}")
