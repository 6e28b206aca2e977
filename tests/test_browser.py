"""The search page in a real browser: Debian's chromium + chromium-driver through selenium.

A server (``zsbir.search.server``, uvicorn) is started on a free port of 127.0.0.1 over an
index of real Sketchy photos (``../shared/data/sketchy-mini-seen``: 7 classes, 175 photos)
built with a quickly trained EfficientNet-Lite0 (ImageNet weights, 60 steps at 128 px,
examples/real/lb.toml otherwise). A real Sketchy bicycle sketch, left out of training, is
traced into strokes (its ink skeleton) and replayed on the canvas with pointer actions; the
results grid must fill and its top results must be bicycles. Undo and Clear are exercised.

Skipped, with the reason, when chromium/chromedriver, selenium, ../shared or the
EfficientNet-Lite0 weights are absent. ``ZSBIR_SCREENSHOTS=DIR`` saves the page with its
results as DIR/search-page.png (the docs' screenshot, docs/assets/).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data" / "sketchy-mini-seen"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SEEN = ["airplane", "apple", "bicycle", "chair", "cup", "fish"]
UNSEEN = "teapot"
DRAWN = "bicycle"
CANVAS = 480  # CSS pixels (static/style.css)


def _requirements() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(.ci/run installs them with apt)")
    pytest.importorskip("selenium", reason="selenium is not installed (dev extra)")
    pytest.importorskip("uvicorn", reason="uvicorn is not installed (serve extra)")
    if not DATA.is_dir():
        pytest.skip(f"../shared is absent ({DATA}); the browser test needs real sketches")
    from zsbir.models.weights_available import weights_available

    if not weights_available("efficientnet_lite0"):
        pytest.skip("EfficientNet-Lite0 ImageNet weights are not installed (weights extra)")
    return chromium, driver


def trace_strokes(path: Path, step: int = 3, min_len: int = 4) -> list[list[list[int]]]:
    """Strokes ([[xs], [ys]] in the image's pixels) along the skeleton of a sketch's ink:
    walks from end points through unvisited 8-neighbours, keeping every ``step``-th pixel."""
    from skimage.morphology import skeletonize

    ink = np.asarray(Image.open(path).convert("L")) < 160
    todo = {(int(y), int(x)) for y, x in np.argwhere(skeletonize(ink))}

    def neighbours(p: tuple[int, int]) -> list[tuple[int, int]]:
        return [(p[0] + dy, p[1] + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                if (dy or dx) and (p[0] + dy, p[1] + dx) in todo]

    strokes = []
    while todo:
        path_ = [min(todo, key=lambda p: (len(neighbours(p)), p))]
        todo.discard(path_[0])
        while nxt := neighbours(path_[-1]):
            nxt.sort(key=lambda q: abs(q[0] - path_[-1][0]) + abs(q[1] - path_[-1][1]))
            path_.append(nxt[0])
            todo.discard(nxt[0])
        if len(path_) >= min_len:
            pts = path_[::step] + ([path_[-1]] if (len(path_) - 1) % step else [])
            strokes.append([[p[1] for p in pts], [p[0] for p in pts]])
    return strokes


@pytest.fixture(scope="module")
def real_index(tmp_path_factory) -> tuple[Path, Path]:
    """(index dir, the held-out sketch): trained and indexed once for this module."""
    _requirements()
    from zsbir.engine.run import run_experiment
    from zsbir.manifest import apply_overrides, load, resolve
    from zsbir.search.store import build_index

    held = sorted((DATA / "sketch" / DRAWN).iterdir())[0]
    root = tmp_path_factory.mktemp("sketchy-7")
    for c in [*SEEN, UNSEEN]:
        for domain in ("sketch", "photo"):
            (root / domain / c).mkdir(parents=True)
            for f in sorted((DATA / domain / c).iterdir()):
                if f != held:  # the drawn sketch is never trained on
                    (root / domain / c / f.name).symlink_to(f)
    base = load(EXAMPLES / "real" / "lb.toml")
    base["protocol"].pop("num_unseen", None)
    out = tmp_path_factory.mktemp("runs")
    raw = apply_overrides(base, [
        f"protocol.root={json.dumps(str(root))}", f"protocol.unseen={json.dumps([UNSEEN])}",
        "train.epochs=1", "train.max_steps_per_epoch=60", "train.batch_size=24",
        "sampler.sketches_per_batch=12", "data.workers=0", "evaluation.grid_queries=2",
        f"run.output_dir={json.dumps(str(out))}", "run.name=browser"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZSBIR_CACHE", str(tmp_path_factory.mktemp("cache")))
        run_experiment(resolve(raw))
    index = tmp_path_factory.mktemp("index") / "sketchy-7"
    # the photo folder is links into ../shared: links leaving the folder are opted in
    build_index(out / "browser", root / "photo", index, device="cpu", workers=0,
                follow_outside_links=True,
                name="Sketchy photos (7 classes)")
    return index, held


@pytest.fixture(scope="module")
def server(real_index):
    import uvicorn

    from zsbir.search.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(real_index[0], device="cpu"),
                                        host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = _requirements()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    yield drv
    drv.quit()


def _draw(driver, canvas, strokes, scale: float, offset: float) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    for xs, ys in strokes:
        pts = [(round(x * scale + offset - CANVAS / 2), round(y * scale + offset - CANVAS / 2))
               for x, y in zip(xs, ys)]
        chain = ActionChains(driver, duration=0)
        chain.move_to_element_with_offset(canvas, *pts[0]).click_and_hold()
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            chain.move_by_offset(x1 - x0, y1 - y0)
        chain.release().perform()


def _labels(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [li.get_attribute("data-label")
            for li in driver.find_elements(By.CSS_SELECTOR, "#results li.result")]


def test_drawing_a_bicycle_finds_bicycles(server, browser, real_index):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "photos" in d.find_element(By.ID, "index-info").text)
    info = browser.find_element(By.ID, "index-info").text
    assert "Sketchy photos (7 classes): 175 photos" in info and "efficientnet_lite0" in info
    assert "cosine similarity" in browser.find_element(By.ID, "score-name").text

    canvas = browser.find_element(By.ID, "canvas")
    strokes = trace_strokes(real_index[1])
    assert len(strokes) >= 5
    side = Image.open(real_index[1]).size[0]
    _draw(browser, canvas, strokes, scale=(CANVAS - 40) / side, offset=20)
    status = browser.find_element(By.ID, "status")
    wait.until(lambda d: "results in" in status.text and len(_labels(d)) == 12)
    time.sleep(0.5)  # a debounced search may still be answering: take the final grid
    wait.until(lambda d: "results in" in status.text)
    labels = _labels(browser)
    # measured on the 2-core VM: 5 of the top 5 (9 of the top 10 through the API)
    assert labels[0] == DRAWN and labels[:5].count(DRAWN) >= 3, labels
    thumbs = browser.find_elements(By.CSS_SELECTOR, "#results li.result img")
    wait.until(lambda d: all(d.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", t) for t in thumbs[:4]))
    shots = os.environ.get("ZSBIR_SCREENSHOTS")
    if shots:
        browser.save_screenshot(str(Path(shots) / "search-page.png"))

    # undo removes the last stroke and searches again; clear empties the grid
    results = browser.find_element(By.ID, "results")
    before = int(results.get_attribute("data-request"))
    browser.find_element(By.ID, "undo").click()
    wait.until(lambda d: int(results.get_attribute("data-request") or 0) > before)
    assert len(_labels(browser)) == 12
    browser.find_element(By.ID, "clear").click()
    wait.until(lambda d: len(_labels(d)) == 0)
    assert browser.find_element(By.ID, "results").get_attribute("data-count") == "0"
