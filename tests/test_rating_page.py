"""rate_dataset.py's study page in a real headless browser (Debian's chromium + chromedriver, Selenium).

One server (the real script, in a subprocess) on real digits and a generated folder; scripted raters
answer by keyboard and by mouse. Each scripted rater tells the images apart by their pixels (the
real test split and the generated folder are known here) and answers by a fixed policy: it picks the
generated image as real in the pairs of its `fooled` classes, the real one elsewhere, and fails every
attention check when `inattentive`. The report's figures are then checked against a hand computation.

Locally a missing chromium or chromedriver skips with a message; under CI=true it fails (.ci/run
installs them).
"""

import io
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, require_module, require_program

TRIALS, CHECKS = 20, 4
TOTAL = TRIALS + CHECKS
# rater -> (classes whose pairs they get wrong, fails the attention checks, answers by mouse)
POLICIES = {"alice": ({0, 1, 2}, False, False), "mallory": (set(), True, False),
            "carol": ({0, 1, 2, 3, 4}, False, False), "dave": ({0}, False, True), "erin": ({9}, False, False)}


@pytest.fixture(scope="module")
def browser_programs():
    require_module("selenium")
    chromium = require_program("chromium", "chromium-browser", "google-chrome",
                               install="apt-get install chromium chromium-driver; .ci/run does it")
    driver = require_program("chromedriver", install="apt-get install chromium-driver; .ci/run does it")
    return chromium, driver


def _new_browser(programs):
    from selenium import webdriver

    chromium, driver = programs
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1100,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    browser.set_page_load_timeout(60)
    return browser


@pytest.fixture(scope="module")
def server(browser_programs, generated_digits, tmp_path_factory):
    """The real rate_dataset.py serving a study on a free port: (base url, argv of the study, ratings dir)."""
    root = tmp_path_factory.mktemp("rating_root")
    argv = ["--dataset", "digits", "--synthetic_dir", str(generated_digits), "--trials", str(TRIALS),
            "--attention_checks", str(CHECKS), "--seed", "3", "--ratings_dir", str(root / "ratings")]
    process = subprocess.Popen([sys.executable, str(REPO / "rate_dataset.py"), *argv, "--port", "0"], cwd=root,
                               env=dict(os.environ, SDDG_OUTPUT_ROOT=str(root), PYTHONUNBUFFERED="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen, url = [], None
    deadline = time.time() + 180
    while url is None and time.time() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        match = re.search(r"study page: (http://\S+)", line)
        url = match.group(1) if match else None
    if url is None:
        process.kill()
        pytest.fail("rate_dataset.py did not start serving:\n" + "".join(seen))
    yield url, argv, root / "ratings"
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def pixels(generated_digits):
    """What each image is, by its 8x8 grey pixels: the real test split and the generated folder."""
    from PIL import Image

    from Data.loaders import load_dataset

    test = load_dataset("digits")
    real = {x[..., 0].tobytes() for x in test.x_test}
    generated = set()
    for path in Path(generated_digits).glob("class_*/*.png"):
        with Image.open(path) as image:
            generated.add(np.asarray(image.convert("L")).tobytes())
    assert not real & generated
    return real, generated


def _what(src, base, pixels):
    from PIL import Image

    with urllib.request.urlopen(urllib.parse.urljoin(base, src), timeout=60) as response:
        with Image.open(io.BytesIO(response.read())) as image:
            big = np.asarray(image.convert("L"))
    assert big.shape == (256, 256)
    small = big[::32, ::32]
    assert np.array_equal(np.repeat(np.repeat(small, 32, 0), 32, 1), big), "not a nearest-neighbour enlargement"
    real, generated = pixels
    key = small.tobytes()
    return "real" if key in real else "generated" if key in generated else "noise"


def _wait(browser, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda b: condition(b))


def _ready(browser):
    """(state, position) once the page shows a trial whose images are on screen, or the end."""
    state = browser.find_element("tag name", "body").get_attribute("data-state")
    if state == "done":
        return "done", None
    busy = "busy" in (browser.find_element("tag name", "body").get_attribute("class") or "")
    if state != "trial" or busy:
        return None
    return "trial", int(browser.find_element("id", "trial").get_attribute("data-position"))


def _start(browser, base, rater):
    browser.get(base)
    _wait(browser, lambda b: b.find_element("tag name", "body").get_attribute("data-state") == "start")
    field = browser.find_element("id", "rater-id")
    field.send_keys(rater)
    browser.find_element("id", "start-button").click()


def _answer(browser, base, pixels, rater, stop_after=None, log=None):
    """Answers from the page's current trial on by the rater's policy; returns the answers given."""
    from selenium.webdriver.common.keys import Keys

    fooled, inattentive, mouse = POLICIES[rater]
    given = []
    while True:
        state, position = _wait(browser, _ready)
        if state == "done" or (stop_after is not None and len(given) >= stop_after):
            return given
        label = int(browser.find_element("id", "class-label").text.split()[0])
        sides = [_what(browser.find_element("css selector", f"#{side} img").get_attribute("src"), base, pixels)
                 for side in ("left", "right")]
        is_check = "noise" in sides
        wanted = ("noise" if inattentive else "real") if is_check else \
            ("generated" if label in fooled else "real")
        side = "left" if sides[0] == wanted else "right"
        assert sides[0 if side == "left" else 1] == wanted, sides
        if mouse:
            browser.find_element("id", side).click()
        else:
            keys = {"left": (Keys.ARROW_LEFT, "f"), "right": (Keys.ARROW_RIGHT, "j")}[side]
            browser.find_element("tag name", "body").send_keys(keys[position % 2])
        given.append({"position": position, "label": label, "check": is_check, "sides": sides, "picked": wanted})
        _wait(browser, lambda b: (r := _ready(b)) is not None and (r[0] == "done" or r[1] > position))


@pytest.fixture(scope="module")
def study_answers():
    return {}


def _check_page(browser):
    text = browser.find_element("tag name", "body").text
    assert "32× their native 8×8 pixels" in text and "nearest neighbour" in text
    assert "Which image is real?" in text
    assert not browser.find_element("id", "rating-buttons").is_displayed()  # a choice: no realism scores
    for element in browser.find_elements("css selector", "script[src], link[href], img[src]"):
        address = element.get_attribute("src") or element.get_attribute("href")
        assert address.startswith(browser.current_url.split("/?")[0]), f"asset from outside the server: {address}"


def test_a_rater_answers_a_whole_study_by_keyboard(server, pixels, browser_programs, study_answers, tmp_path):
    base, _, ratings = server
    browser = _new_browser(browser_programs)
    try:
        _start(browser, base, "alice")
        _wait(browser, _ready)
        _check_page(browser)
        assert browser.find_element("id", "progress-text").text == f"0 / {TOTAL}"
        screenshot = tmp_path / "rating_page.png"
        browser.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
        given = _answer(browser, base, pixels, "alice")
        assert browser.find_element("id", "progress-text").text == f"{TOTAL} / {TOTAL}"
        assert "Thank you" in browser.find_element("id", "done").text
    finally:
        browser.quit()
    assert len(given) == TOTAL and sum(g["check"] for g in given) == CHECKS
    assert np.bincount([g["label"] for g in given if not g["check"]]).tolist() == [TRIALS // 10] * 10
    study_answers["alice"] = given
    answers = _saved(ratings, "alice")
    assert [a["position"] for a in answers] == list(range(TOTAL))
    assert [a["picked"] for a in answers] == [g["picked"] for g in given]
    assert all(a["left"] == g["sides"][0] and a["right"] == g["sides"][1] for a, g in zip(answers, given))


def _saved(ratings, rater):
    (study,) = [p for p in ratings.iterdir() if p.is_dir()]
    return [json.loads(line) for line in (study / "answers" / f"{rater}.jsonl").read_text().splitlines()]


def test_a_rater_failing_the_attention_checks(server, pixels, browser_programs, study_answers):
    base, _, ratings = server
    browser = _new_browser(browser_programs)
    try:
        _start(browser, base, "mallory")
        study_answers["mallory"] = _answer(browser, base, pixels, "mallory")
    finally:
        browser.quit()
    checks = [a for a in _saved(ratings, "mallory") if a["kind"] == "check"]
    assert len(checks) == CHECKS and all(a["picked"] == "noise" for a in checks)


def test_a_reload_resumes_where_the_rater_was(server, pixels, browser_programs, study_answers):
    base, _, ratings = server
    browser = _new_browser(browser_programs)
    try:
        _start(browser, base, "carol")
        given = _answer(browser, base, pixels, "carol", stop_after=7)
        browser.refresh()
        state, position = _wait(browser, _ready)
        assert (state, position) == ("trial", 7)
        assert browser.find_element("id", "progress-text").text == f"7 / {TOTAL}"
        given += _answer(browser, base, pixels, "carol", stop_after=5)
        browser.get(base)  # the bare address: the browser remembers the rater
        assert _wait(browser, _ready) == ("trial", 12)
        assert "carol" in browser.current_url
        given += _answer(browser, base, pixels, "carol")
    finally:
        browser.quit()
    study_answers["carol"] = given
    answers = _saved(ratings, "carol")
    assert [a["position"] for a in answers] == list(range(TOTAL))
    assert sorted(a["trial"] for a in answers) == list(range(TOTAL))


def test_two_raters_at_once_lose_nothing(server, pixels, browser_programs, study_answers):
    base, _, ratings = server
    browsers = {rater: _new_browser(browser_programs) for rater in ("dave", "erin")}
    results, errors = {}, []

    def rate(rater):
        try:
            _start(browsers[rater], base, rater)
            results[rater] = _answer(browsers[rater], base, pixels, rater)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(f"{rater}: {e!r}")

    try:
        threads = [threading.Thread(target=rate, args=(rater,)) for rater in browsers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
    finally:
        for browser in browsers.values():
            browser.quit()
    assert not errors, errors
    for rater in browsers:
        answers = _saved(ratings, rater)
        assert len(answers) == TOTAL and [a["position"] for a in answers] == list(range(TOTAL))
        assert [a["picked"] for a in answers] == [g["picked"] for g in results[rater]]
    study_answers.update(results)


def test_the_report_matches_a_hand_computation(server, study_answers, run_script):
    if set(study_answers) != set(POLICIES):
        pytest.skip("needs every rater of the tests above")
    _, argv, ratings = server
    done = run_script("rate_dataset.py", *argv, "--report")
    assert done.returncode == 0, done.stderr
    (study,) = [p for p in ratings.iterdir() if p.is_dir()]
    report = json.loads((study / "report.json").read_text())
    # Kept: alice, carol, dave, erin (every trial, no check failed); mallory failed 4 of 4 checks.
    assert (report["raters_kept"], report["raters_excluded"], report["excluded_failed_checks"]) == (4, 1, 1)
    assert (report["pair_trials_kept"], report["pair_trials_excluded"]) == (80, 20)
    # Fooled pairs, 2 per class: alice 3 classes (6), carol 5 (10), dave 1 (2), erin 1 (2): 20 of 80.
    fool = report["fooling_rate"]
    assert (fool["k"], fool["n"], fool["rate"]) == (20, 80, 0.25)
    # Wilson, z = 1.959964: (0.25 + z^2/160 -+ z sqrt(0.25 * 0.75 / 80 + z^2 / 25600)) / (1 + z^2/80).
    z = 1.959964
    centre = (0.25 + z * z / 160) / (1 + z * z / 80)
    half = z / (1 + z * z / 80) * (0.25 * 0.75 / 80 + z * z / 25600) ** 0.5
    assert fool["low"] == pytest.approx(centre - half, abs=1e-5) == pytest.approx(0.168062, abs=1e-5)
    assert fool["high"] == pytest.approx(centre + half, abs=1e-5) == pytest.approx(0.354847, abs=1e-5)
    # Per class, of 8 pairs (4 raters x 2): class 0 fooled alice, carol, dave: 6; 1 and 2: 4; 3, 4, 9: 2.
    per_class = {int(k): v["k"] for k, v in report["fooling_rate_per_class"].items()}
    assert per_class == {0: 6, 1: 4, 2: 4, 3: 2, 4: 2, 5: 0, 6: 0, 7: 0, 8: 0, 9: 2}
    assert all(v["n"] == 8 for v in report["fooling_rate_per_class"].values())
    # Agreement over the 20 pairs, 4 raters each; g = raters picking the generated image:
    # class 0: g = 3, P_i = (9 + 1 - 4) / 12 = 1/2; 1, 2: g = 2, P_i = 1/3; 3, 4, 9: g = 1, P_i = 1/2;
    # 5-8: g = 0, P_i = 1. P = 2 (1/2 + 1/3 + 1/3 + 1/2 + 1/2 + 4 + 1/2) / 20 = 2/3.
    # p = (0.75, 0.25) -> P_e = 0.625; kappa = (2/3 - 0.625) / 0.375 = 1/9.
    agreement = report["agreement"]
    assert agreement["items"] == 20 and agreement["raters_per_item"] == [4]
    assert agreement["pairwise"] == pytest.approx(2 / 3)
    assert agreement["fleiss_kappa"] == pytest.approx(1 / 9)
    out = done.stdout
    assert "**25.0 %** (95 % Wilson interval 16.8–35.5 %), 20 of 80" in out
    assert "4 kept, 1 excluded (1 failed more than 1 attention check(s), 0 incomplete)" in out
    assert "pairwise 66.7 %, Fleiss' kappa 0.111" in out
    assert "| mallory | no: failed attention checks | 4 of 4 | 24 |" in out


def test_realism_ratings_by_keyboard_and_mouse(browser_programs, generated_digits, tmp_path):
    from Pipeline.rating import AnswerStore, RatingSettings, Study, StudyServer, create_app

    settings = RatingSettings(dataset="digits", synthetic_dir=str(generated_digits), trials=2, attention_checks=0,
                              realism_trials=4, ratings_dir=str(tmp_path), port=0)
    study = Study(settings, log=lambda *_: None)
    study.write_description()
    store = AnswerStore(study.directory)
    server = StudyServer(create_app(study, store, log=lambda *_: None), "127.0.0.1", 0).start()
    browser = _new_browser(browser_programs)
    try:
        browser.get(f"{server.url}?rater=rita")
        scores = []
        while True:
            state, position = _wait(browser, _ready)
            if state == "done":
                break
            if browser.find_element("id", "trial").get_attribute("data-kind") == "choice":
                browser.find_element("tag name", "body").send_keys("f")
            else:
                assert browser.find_element("id", "rating-buttons").is_displayed()
                assert len(browser.find_elements("css selector", "#single img")) == 1
                score = 1 + len(scores)
                if score % 2:
                    browser.find_element("tag name", "body").send_keys(str(score))
                else:
                    browser.find_element("css selector", f"#rating-buttons [data-score='{score}']").click()
                scores.append(score)
            _wait(browser, lambda b: (r := _ready(b)) is not None and (r[0] == "done" or r[1] > position))
    finally:
        browser.quit()
        server.stop()
    singles = [a for a in store.answers("rita") if a["kind"] == "single"]
    assert [a["score"] for a in singles] == [1, 2, 3, 4]
    assert sorted(a["shown"] for a in singles) == ["generated", "generated", "real", "real"]


def test_the_screenshot_script_writes_a_png(server, browser_programs, tmp_path):
    _, argv, _ = server
    out = tmp_path / "page.png"
    done = subprocess.run([sys.executable, str(REPO / "docs" / "rating_page_screenshot.py"), *argv[:4],
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=dict(os.environ, SDDG_OUTPUT_ROOT=str(tmp_path)))
    assert done.returncode == 0, done.stdout + done.stderr
    from PIL import Image

    with Image.open(out) as image:
        assert image.size[0] >= 800 and image.format == "PNG"
