"""The demo in a real browser: start `python app.py` on localhost (tiny pipeline), drive it in headless Chromium,
upload a portrait and two voices, press Generate, and check that a video appears. The finished page's screenshot
is kept in `test-artifacts/app.png`. Skipped without Debian's chromium or the playwright package (`.ci/run`
installs both)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import soundfile

from pipeline_infp.processing import SAMPLE_RATE, load_audio
from tests.utils import tiny_random_pipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LIVE_STREAMING = bool(shutil.which("ffmpeg") and shutil.which("ffprobe"))  # as app.py decides
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app")
    tiny_random_pipeline().save_pretrained(folder / "pipeline")
    port = free_port()
    env = os.environ | {
        "INFP_CHECKPOINT": str(folder / "pipeline"), "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False",
    }  # fmt: skip
    log = open(folder / "app.log", "w")
    process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail("the app did not start:\n" + (folder / "app.log").read_text()[-3000:])
            time.sleep(0.5)
    yield url, folder
    process.terminate()
    process.wait(timeout=20)
    log.close()


def test_upload_generate_and_see_the_video(server):
    url, folder = server
    voices = {}
    for name, source in (("own", "conversation-man.wav"), ("partner", "conversation-woman.wav")):
        voices[name] = folder / f"{name}.wav"
        soundfile.write(voices[name], load_audio(REPO_ROOT / "examples" / source)[: 2 * SAMPLE_RATE], SAMPLE_RATE)
    artifacts = REPO_ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.locator("#portrait input[type=file]").set_input_files(str(REPO_ROOT / "examples" / "portrait-s1.jpg"))
        page.locator("#own-audio input[type=file]").set_input_files(str(voices["own"]))
        page.locator("#partner-audio input[type=file]").set_input_files(str(voices["partner"]))
        for name in ("own", "partner"):  # uploaded: the component holds a player (hidden behind its waveform)
            page.locator(f"#{name}-audio audio").first.wait_for(state="attached", timeout=30_000)
        page.locator("#generate").click()
        if LIVE_STREAMING:  # the windows play in the live player before the whole video is written
            page.locator("#live video").wait_for(timeout=180_000)
        video = page.locator("#result video")
        video.wait_for(timeout=180_000)
        assert video.get_attribute("src")
        page.locator("#timeline img, #timeline svg, #timeline canvas").first.wait_for(timeout=30_000)
        page.screenshot(path=str(artifacts / "app.png"), full_page=True)
        browser.close()
    assert (artifacts / "app.png").stat().st_size > 10_000
    assert "Traceback" not in (folder / "app.log").read_text()
