"""`wanmoe serve` for real: the server in a subprocess, driven by headless Chromium (Debian's `chromium` through its
own `chromium-driver`, with selenium) and by the README's curl session.

The browser test uploads a face and a voice, picks the fast preset, starts a job and sees its progress move and its
decoded frames while it still runs, starts a second job that waits its turn, is told why a bad upload is refused,
and finds both videos, playable and with sound, in the history. One server serves every test here (the embedded
s2v-mini on the CPU); together they take well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from wanmoe import media

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SHOTS = os.environ.get("WANMOE_SCREENSHOTS")  # a folder: the browser test saves idle/running/finished.png there


def _shot(d, name: str) -> None:  # noqa: ANN001 (a selenium driver)
    """The whole page as a PNG (docs/app/*.png are made this way: WANMOE_SCREENSHOTS=docs/app)."""
    if not SHOTS:
        return
    import base64

    size = d.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    png = d.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip})
    Path(SHOTS).mkdir(parents=True, exist_ok=True)
    (Path(SHOTS) / f"{name}.png").write_bytes(base64.b64decode(png["data"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("gradio", reason="the [app] extra (gradio) is not installed")
    out = tmp_path_factory.mktemp("app")
    port = _free_port()
    log = open(out.parent / "server.log", "w")  # noqa: SIM115 (closed at teardown)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="2")
    proc = subprocess.Popen([sys.executable, "-m", "wanmoe", "serve", "--out_dir", str(out), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            pytest.fail(f"wanmoe serve exited with {proc.returncode}:\n{(out.parent / 'server.log').read_text()}")
        try:
            if _get(url + "/api/jobs", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        if time.time() - t0 > 120:
            proc.kill()
            pytest.fail("wanmoe serve did not answer within 120 s:\n" + (out.parent / "server.log").read_text())
        time.sleep(0.2)
    print(f"server up in {time.time() - t0:.1f} s")
    yield url, out
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/setup.sh dev installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the [dev] extra)")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for a driver online
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="wanmoe-chromium-")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
              "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={profile}", "--window-size=1400,1600"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield d
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _wait(cond, timeout: float = 60.0, what: str = "condition"):
    t0 = time.time()
    while True:
        try:
            v = cond()
        except Exception:  # noqa: BLE001 (elements come and go while gradio re-renders)
            v = None
        if v:
            return v
        if time.time() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _inputs(tmp: Path) -> dict[str, Path]:
    """A face (the shipped one, mirrored: a file of the test's own), a voice, and a 'png' that is not an image."""
    from conftest import speech_like, write_wav
    from PIL import Image

    tag = os.urandom(4).hex()  # names no other program uses: the test looks for them outside the app's folder
    ex = Image.open(ROOT / "src/wanmoe/assets/s2v-mini/example/ref.png").convert("RGB")
    Image.fromarray(np.ascontiguousarray(np.asarray(ex)[:, ::-1])).save(tmp / f"face-{tag}.png")
    write_wav(tmp / f"voice-{tag}.wav", speech_like(1.5))
    (tmp / f"broken-{tag}.png").write_text("this is not a picture")
    return {"face": tmp / f"face-{tag}.png", "voice": tmp / f"voice-{tag}.wav", "broken": tmp / f"broken-{tag}.png",
            "tag": tag}


def test_browser_upload_generate_queue_history(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, out = server
    d = browser
    files = _inputs(tmp_path)
    d.get(url)
    card = lambda: d.find_element(By.ID, "wm-status-card")  # noqa: E731
    warm = lambda: card().get_attribute("data-state") not in (None, "warming")  # noqa: E731
    if SHOTS:
        _wait(warm, 90, "the warm-up to finish")
        _shot(d, "idle")

    def upload(elem: str, clear_label: str, path: Path) -> None:
        clear = f'#{elem} button[aria-label="{clear_label}"]'  # drop the example (once the page has drawn it)
        _wait(lambda: d.find_element(By.CSS_SELECTOR, clear), 30, f"{elem} to show its example").click()
        box = _wait(lambda: d.find_element(By.CSS_SELECTOR, f"#{elem} input[type=file]"), 10, f"{elem} upload")
        box.send_keys(str(path))

    upload("wm-image", "Remove Image", files["face"])
    upload("wm-audio", "Clear", files["voice"])
    _wait(lambda: d.find_elements(By.CSS_SELECTOR, '#wm-audio button[aria-label="Clear"]'), 20, "the voice upload")
    d.find_element(By.CSS_SELECTOR, '#wm-quality input[value="fast"]').click()
    d.find_element(By.CSS_SELECTOR, "#wm-advanced button.label-wrap").click()  # open "Advanced"
    _wait(lambda: d.find_element(By.CSS_SELECTOR, "#wm-steps input[type=number]").get_attribute("value") == "4",
          10, "the fast preset to set 4 steps")
    d.find_element(By.CSS_SELECTOR, "#wm-advanced button.label-wrap").click()  # and close it again
    _wait(warm, 90, "the warm-up to finish")  # so that the time to the first frame is the job's own

    def message() -> str:
        return d.find_element(By.ID, "wm-message").text

    go = d.find_element(By.ID, "wm-generate")
    t_click = time.time()
    go.click()
    first = re.search(r"Queued job (\S+)", _wait(lambda: "Queued job" in message() and message(), 20, "job 1")).group(1)
    # A second job at once, while the first runs: it waits its turn, with its position.
    go.click()
    second = re.search(r"Queued job (\S+)", _wait(lambda: first not in message() and message(), 20, "job 2")).group(1)
    assert second != first and "position" in message()
    # Watch job 1: its steps and decoded frames move on screen while it runs, job 2 waiting at position 1 meanwhile.
    look = ("const c = document.getElementById('wm-status-card'); if (!c) return null;"  # one atomic read a look
            "return [c.dataset.job, c.dataset.state, +c.dataset.step, +c.dataset.frames,"
            " !!document.getElementById('wm-frame'),"
            " [...document.querySelectorAll('.wm-queue-item')].map(e => e.innerText).join('|')];")
    steps_seen, frames_seen, t_frame, waited = set(), set(), None, False
    while True:
        job, state, step, frames, shown, queue = d.execute_script(look) or (None,) * 6
        if job == first and state in ("running", "queued"):
            steps_seen.add(step)
            if frames > 0 and shown:
                frames_seen.add(frames)
                if t_frame is None:
                    t_frame = time.time()
                    _shot(d, "running")
            waited = waited or re.search(rf"{second}\W+waiting, position 1", queue) is not None
        elif steps_seen:  # job 1 has left the panel (done, or job 2 took its place)
            break
        assert time.time() - t_click < 60, "job 1 did not finish within 60 s"
        time.sleep(0.05)
    # The four fast steps may all pass between two looks; the decode of 65 frames in a dozen groups does not.
    assert len(steps_seen) + len(frames_seen) >= 3, f"progress did not move: {steps_seen}, {frames_seen}"
    assert len(frames_seen) >= 2 and t_frame is not None, f"decoded frames did not stream: {frames_seen}"
    assert waited, "job 2 was never shown waiting at position 1 while job 1 ran"
    ttff = t_frame - t_click
    print(f"time to first frame in the browser: {ttff:.2f} s; steps seen {sorted(steps_seen)}; "
          f"frame counts seen {sorted(frames_seen)[:5]}...")
    (out / "browser_ttff.json").write_text(json.dumps({"ttff_s": ttff}))
    # Both videos end up in the history, playable and with sound; the second started after the first ended.
    _wait(lambda: len(d.find_elements(By.CSS_SELECTOR, ".wm-history-item video")) >= 2, 60, "two videos in history")
    jobs = {j["id"]: j for j in json.loads(_get(url + "/api/jobs")[1])}
    assert jobs[first]["state"] == jobs[second]["state"] == "done"
    assert jobs[second]["started"] >= jobs[first]["finished"]
    video = d.find_elements(By.CSS_SELECTOR, ".wm-history-item video")[0]
    d.execute_script("arguments[0].muted = true; arguments[0].play();", video)
    _wait(lambda: d.execute_script("return arguments[0].readyState >= 2 && arguments[0].duration > 0", video),
          20, "the video to play")
    decoded = _wait(lambda: d.execute_script("return arguments[0].webkitAudioDecodedByteCount", video), 20,
                    "audio to decode in the browser")
    assert decoded > 0
    _shot(d, "finished")
    status, body = _get(video.get_attribute("src"))
    assert status == 200
    mp4 = tmp_path / "from_page.mp4"
    mp4.write_bytes(body)
    info = media.probe_video(mp4)
    assert info["frames"] > 0 and info["audio_duration"] > 0.5
    assert d.find_elements(By.CSS_SELECTOR, ".wm-history-item .wm-dl-mp4") and d.find_elements(
        By.CSS_SELECTOR, ".wm-history-item .wm-dl-json")
    # A bad upload: refused with the library's message, nothing queued.
    upload("wm-image", "Remove Image", files["broken"])
    time.sleep(0.5)
    go.click()
    _wait(lambda: "Not queued" in message(), 20, "the bad-upload message")
    assert f"image cannot read '{files['broken'].name}' as an image" in message(), message()
    assert len(json.loads(_get(url + "/api/jobs")[1])) == 2
    # "Use these settings again" puts the job's settings back into the form.
    box = d.find_element(By.CSS_SELECTOR, "#wm-prompt textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("a different prompt")  # typed, so the page's state changes as a user's would
    d.find_elements(By.CSS_SELECTOR, ".wm-history-item .wm-again")[-1].click()  # the oldest: job 1
    prompt = lambda: d.find_element(By.CSS_SELECTOR, "#wm-prompt textarea").get_attribute("value")  # noqa: E731
    _wait(lambda: prompt() == jobs[first]["prompt"], 10, "the restored prompt")
    assert d.find_elements(By.CSS_SELECTOR, "#wm-image img")  # its own copy of the face is back
    # Uploads landed in the app's folder only (gradio's default cache is elsewhere, under the temp folder).
    tag = files["tag"]
    assert list(out.rglob(f"face-{tag}.png")) and list(out.rglob(f"voice-{tag}.wav"))
    assert not list((Path(tempfile.gettempdir()) / "gradio").rglob(f"*{tag}*"))


def test_readme_http_example(server, tmp_path):
    """The curl session in README, as written, against the running server."""
    url, _ = server
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- http-example -->\n```bash\n(.*?)```", text, re.S)
    assert block, "README has no http-example block"
    (tmp_path / "src/wanmoe/assets").mkdir(parents=True)
    (tmp_path / "src/wanmoe/assets/s2v-mini").symlink_to(ROOT / "src/wanmoe/assets/s2v-mini")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block.group(1)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, WANMOE_URL=url))
    assert r.returncode == 0, r.stdout + r.stderr
    info = media.probe_video(tmp_path / "talking.mp4")
    side = json.loads((tmp_path / "talking.json").read_text())
    assert info["frames"] == side["frames"] > 0 and info["audio_duration"] > 0
    assert side["settings"]["prompt"] == "a yellow face talking"


def test_http_api_errors_and_cancel(server):
    url, _ = server

    def call(method: str, path: str, fields: dict | None = None) -> tuple[int, dict]:
        body, headers = None, {}
        if fields is not None:
            boundary = "wanmoe-test-boundary"
            parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                     for k, v in fields.items()]
            body = ("".join(parts) + f"--{boundary}--\r\n").encode()
            headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        req = urllib.request.Request(url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    code, err = call("POST", "/api/jobs", {"steps": "0"})
    assert code == 422 and err["field"] == "steps" and "[1, 1000]" in err["error"]
    code, err = call("POST", "/api/jobs", {"colour": "red"})
    assert code == 422 and "is not a field" in err["error"]
    code, err = call("POST", "/api/jobs", {"tts_text": "hello", "tts_voice": "en; rm -rf /"})
    assert code == 422 and err["field"] == "tts_voice"
    assert call("GET", "/api/jobs/nope")[0] == 404
    # The embedded task's example face and voice stand in for missing uploads; a long job, cancelled.
    code, job = call("POST", "/api/jobs", {"steps": "200", "seed": "1"})
    assert code == 201 and job["state"] in ("queued", "running"), job
    assert call("GET", f"/api/jobs/{job['id']}/video")[0] == 409  # not done yet
    code, st = call("DELETE", f"/api/jobs/{job['id']}")
    assert code == 200
    _wait(lambda: call("GET", f"/api/jobs/{job['id']}")[1]["state"] == "cancelled", 30, "the cancel")
