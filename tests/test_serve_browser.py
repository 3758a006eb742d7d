"""The serve-local browser page in headless Chromium (demo model, CPU): the page starts a session,
negotiates WebRTC, plays an audio file and then the (fake) microphone into it, and the avatar's video
and speech arrive over WebRTC: frames are shown, audio with energy is received, and the picture drawn
from the <video> element is the reference face."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("aiortc")
sync_api = pytest.importorskip("playwright.sync_api")

from livetalk_cli.media import decode_image, load_audio, write_wav  # noqa: E402
from livetalk_cli.pipeline import load_model  # noqa: E402
from livetalk_cli.serve.app import ServerConfig, serve_in_thread  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FACE = ROOT / "examples" / "face.png"
CHROMIUM = Path("/usr/bin/chromium")
GRID = 12  # the page's frameStats thumbnail is GRID x GRID RGB cell means
WAIT_MS = 45_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists() and shutil.which("chromium") is None,
                                reason="needs Chromium at /usr/bin/chromium")


@pytest.fixture(scope="module")
def model():
    return load_model(checkpoint=None, preset_name=None, random_weights=False, device=torch.device("cpu"),
                      dtype=torch.float32, seed=0)


@pytest.fixture(scope="module")
def server_url(model):
    with serve_in_thread(model, ServerConfig()) as url:
        yield url, model.cfg


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")),
                              args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required",
                                    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"])
        yield b
        b.close()


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _reference_grid(height: int, width: int) -> np.ndarray:
    """The reference image as the server fits it, as GRID x GRID cell means (RGB, 0-255)."""
    img = ((decode_image(FACE.read_bytes(), height, width, "crop").permute(1, 2, 0).numpy() + 1.0) * 127.5)
    rows = np.array_split(np.arange(height), GRID)
    cols = np.array_split(np.arange(width), GRID)
    return np.array([[img[r][:, c].reshape(-1, 3).mean(0) for c in cols] for r in rows])


def _check_face(page, reference: np.ndarray) -> float:
    """The current video frame is not black and looks like the reference: luma layout correlation."""
    stats = page.evaluate(f"window.livetalk.frameStats({GRID})")
    assert stats is not None, "the <video> has no frame to draw"
    assert stats["mean"] and min(stats["mean"]) > 40 and stats["std"] > 20, stats  # not black, not flat
    grid = np.array(stats["grid"], float).reshape(GRID, GRID, 3)
    corr = float(np.corrcoef(_luma(grid).ravel(), _luma(reference).ravel())[0, 1])
    flipped = float(np.corrcoef(_luma(grid).ravel(), _luma(reference[::-1]).ravel())[0, 1])
    assert corr > 0.8 and corr > flipped + 0.3, (corr, flipped)
    return corr


def _events(page, kind: str) -> list[dict]:
    return page.evaluate(f"window.livetalk.events.filter(e => e.type === {kind!r})")


def test_page_session_over_webrtc(server_url, browser, tmp_path):
    url, cfg = server_url
    reference = _reference_grid(cfg.height, cfg.width)
    speech = tmp_path / "speech.wav"
    write_wav(speech, load_audio(ROOT / "examples" / "speech.wav")[: 3 * 16000])

    page = browser.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    page.goto(url + "/")
    assert page.title() == "livetalk serve-local"
    page.set_input_files("#image", str(FACE))
    page.click("#start")
    page.wait_for_function("window.livetalk.session !== null", timeout=WAIT_MS)
    session = page.evaluate("window.livetalk.session")
    page.wait_for_function("window.livetalk.framesShown >= 10", timeout=WAIT_MS)

    # turn 1: an audio file
    page.set_input_files("#audio-file", str(speech))
    page.click("#send-audio")
    page.wait_for_function("window.livetalk.events.some(e => e.type === 'turn_ended')", timeout=WAIT_MS)
    page.wait_for_function("window.livetalk.framesShown >= 30", timeout=WAIT_MS)
    latency = page.evaluate("window.livetalk.latencyMs")
    assert latency is not None and 0 < latency < 20_000
    assert "speaking" in [e["state"] for e in _events(page, "state")]
    rtc = page.evaluate("window.livetalk.rtcStats()")
    assert rtc["connection"] == "connected", rtc
    assert rtc["video"]["framesDecoded"] >= 30, rtc
    assert rtc["audio"]["packetsReceived"] > 50 and rtc["audio"]["totalSamplesReceived"] > 0, rtc
    assert rtc["audio"]["totalAudioEnergy"] > 1e-3, rtc  # speech was heard, not only silence packets
    _check_face(page, reference)

    # turn 2: the (fake) microphone through the AudioWorklet, on the same session
    shown = page.evaluate("window.livetalk.framesShown")
    page.click("#mic")
    page.wait_for_function("window.livetalk.micChunks >= 10", timeout=WAIT_MS)  # 1 s of 16 kHz PCM16
    # the echo avatar speaks while the user still talks: the turn ends only with the page's end_turn
    page.wait_for_function("window.livetalk.events.filter(e => e.type === 'turn_started').length >= 2",
                           timeout=WAIT_MS)
    assert page.get_attribute("#mic", "aria-pressed") == "true"
    assert len(_events(page, "turn_ended")) == 1
    page.click("#mic")
    page.wait_for_function("document.getElementById('mic').getAttribute('aria-pressed') === 'false'")
    page.wait_for_function("window.livetalk.events.filter(e => e.type === 'turn_ended').length >= 2",
                           timeout=WAIT_MS)
    page.wait_for_function(f"window.livetalk.framesShown >= {shown + 16}", timeout=WAIT_MS)
    assert [e["turn"] for e in _events(page, "turn_started")] == [1, 2]
    assert page.evaluate("window.livetalk.session") == session
    assert [e["session"] for e in _events(page, "started")] == [session]
    _check_face(page, reference)
    stats = page.evaluate("window.livetalk.stats")
    assert stats is not None and stats["sessions"] == 1 and stats["fps"] > 0, stats
    assert page.inner_text("#stat-sessions") == "1"
    assert page.evaluate("window.livetalk.audioPackets") > 0
    assert page.evaluate("window.livetalk.errors") == [] and page_errors == []

    page.click("#stop")
    page.wait_for_function("!window.livetalk.connected", timeout=WAIT_MS)
    page.close()


def test_page_token_and_refused_start(model, browser, tmp_path):
    """The page forwards ?token= to the WebSocket; a refused connection and a refused start are shown
    and leave the page ready to start again. No session is started (nothing is rendered)."""
    not_image = tmp_path / "face.png"
    not_image.write_bytes(b"this is not an image")
    with serve_in_thread(model, ServerConfig(token="s3cret")) as url:
        page = browser.new_page()
        page.goto(url + "/?token=wrong")
        page.set_input_files("#image", str(FACE))
        page.click("#start")
        page.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
        assert "refused the connection" in page.inner_text("#error")
        page.wait_for_function("!document.getElementById('start').disabled", timeout=WAIT_MS)

        page.goto(url + "/?token=s3cret")
        page.set_input_files("#image", str(not_image))
        page.click("#start")
        page.wait_for_selector("#error:not([hidden])", timeout=WAIT_MS)
        page.wait_for_function("!document.getElementById('start').disabled", timeout=WAIT_MS)
        text = page.inner_text("#error")
        assert "(bad_media)" in text and "refused the connection" not in text and "no_session" not in text, text
        assert page.evaluate("[window.livetalk.session, window.livetalk.live, window.livetalk.connected]") == [
            None, False, False]
        assert page.is_disabled("#mic") and page.is_disabled("#send-audio")
        page.close()
