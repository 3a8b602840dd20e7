"""rate_dataset.py without a browser: the statistics against hand computations, the study built from real
digits and a generated folder, the answer files (duplicates, torn lines, many raters at once over HTTP),
the report and REPORT.md's section. The page in a real browser: tests/test_rating_page.py."""

import json
import math
import threading
import urllib.request

import numpy as np
import pytest

from Metrics.errors import MetricsError
from Metrics.rating_stats import (agreement, fleiss_kappa, fooling_rate, pairwise_agreement, rater_status,
                                  summarize, wilson_interval)
from Pipeline.rating import (AnswerStore, RatingSettings, Study, StudyServer, create_app, read_answers, report,
                             study_summary, summary_lines)
from Utils.cli import UserError


# ------------------------------------------------------------ statistics ----

def test_wilson_interval_matches_a_hand_computation():
    # 20 of 80, z = 1.959964: centre (0.25 + z^2/160) / (1 + z^2/80) = 0.261455,
    # half width z / (1 + z^2/80) * sqrt(0.25 * 0.75 / 80 + z^2 / 25600) = 0.093392.
    low, high = wilson_interval(20, 80)
    assert low == pytest.approx(0.168062, abs=1e-6) and high == pytest.approx(0.354847, abs=1e-6)
    # 0 of 10: [0, z^2 / (10 + z^2)] = [0, 0.277533]; 10 of 10 mirrors it.
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.277533, abs=1e-6))
    assert wilson_interval(10, 10) == (pytest.approx(0.722467, abs=1e-6), 1.0)
    assert wilson_interval(0, 0) == (None, None)
    with pytest.raises(MetricsError):
        wilson_interval(3, 2)


def test_fleiss_kappa_and_pairwise_agreement_match_a_hand_computation():
    # Three items, four raters, counts of (picked real, picked generated):
    # P_i = (sum n_ij^2 - 4) / 12 = 0.5, 1/3, 1 -> P = 0.6111; p = (5/12, 7/12) -> P_e = 74/144;
    # kappa = (0.6111 - 0.5139) / (1 - 0.5139) = 0.2.
    counts = [[3, 1], [2, 2], [0, 4]]
    assert pairwise_agreement(counts) == pytest.approx(11 / 18)
    assert fleiss_kappa(counts) == pytest.approx(0.2)
    # Items rated by different numbers of raters: (2, 0) P=1, (1, 2) P=1/3 -> P = 2/3; p = (3/5, 2/5) -> P_e = 13/25.
    assert fleiss_kappa([[2, 0], [1, 2], [1, 0]]) == pytest.approx((2 / 3 - 13 / 25) / (1 - 13 / 25))
    assert fleiss_kappa([[4, 0], [3, 0]]) is None  # every answer alike: undefined
    assert fleiss_kappa([[1, 0]]) is None and pairwise_agreement([]) is None


def _pair(trial, label, picked):
    return {"trial": trial, "kind": "pair", "label": label, "picked": picked}


def test_fooling_rate_exclusion_and_agreement_from_answers():
    a = [_pair(0, 0, "generated"), _pair(1, 0, "real"), _pair(2, 1, "real"),
         {"trial": 3, "kind": "check", "label": 1, "picked": "real"}]
    b = [_pair(0, 0, "generated"), _pair(1, 0, "generated"), _pair(2, 1, "real"),
         {"trial": 3, "kind": "check", "label": 1, "picked": "noise"}]
    overall, per_class = fooling_rate(a + b)
    assert (overall["k"], overall["n"], overall["rate"]) == (3, 6, 0.5)
    assert per_class[0]["rate"] == 0.75 and per_class[1]["rate"] == 0.0
    assert rater_status(a, 4, 0)[:2] == (True, "kept")
    assert rater_status(b, 4, 0)[:2] == (False, "failed attention checks") and rater_status(b, 4, 1)[0]
    assert rater_status(a[:2], 4, 0)[:2] == (False, "incomplete")
    shared = agreement({"a": a, "b": b})  # (real, generated) picks per item: (0, 2), (1, 1), (2, 0)
    assert shared["items"] == 3 and shared["pairwise"] == pytest.approx(2 / 3)
    summary = summarize({"a": a, "b": b}, total_trials=4, max_failed_checks=0)
    assert summary["raters_kept"] == 1 and summary["excluded_failed_checks"] == 1
    assert summary["pair_trials_kept"] == 3 and summary["pair_trials_excluded"] == 3
    assert summary["fooling_rate"]["k"] == 1


# ------------------------------------------------------------ the study ----

def _settings(folder, tmp_path, **changes):
    values = dict(dataset="digits", synthetic_dir=str(folder), ratings_dir=str(tmp_path / "ratings"), trials=20,
                  attention_checks=4, port=0)
    return RatingSettings(**{**values, **changes})


def test_the_study_pairs_real_and_generated_images_of_one_class(generated_digits, tmp_path):
    from Data.loaders import load_dataset

    settings = _settings(generated_digits, tmp_path, realism_trials=5)
    study = Study(settings, log=lambda *_: None)
    kinds = [t["kind"] for t in study.trials]
    assert kinds.count("pair") == 20 and kinds.count("check") == 4 and kinds.count("single") == 5
    assert np.bincount([t["label"] for t in study.trials if t["kind"] == "pair"]).tolist() == [2] * 10
    assert sum(t.get("shown") == "generated" for t in study.trials) == 3  # ceil(5 / 2)
    test = load_dataset("digits")
    real_keys = {x.tobytes(): y for x, y in zip(test.x_test, test.y_test)}
    used = [study.real[t["real"]].tobytes() for t in study.trials if "real" in t]
    assert all(real_keys[k] == t["label"] for k, t in zip(used, [t for t in study.trials if "real" in t]))
    assert len(set(used)) == len(used), "a real image is shown twice"
    assert study.scale == 32  # 8 px -> 256 px
    # Same settings, same trials; each rater has their own order and sides.
    again = Study(settings, log=lambda *_: None)
    assert [t["label"] for t in again.trials] == [t["label"] for t in study.trials]
    assert np.array_equal(again.generated, study.generated)
    order_a, sides_a = study.plan("alice")
    order_b, _ = study.plan("bob")
    assert sorted(order_a) == list(range(29)) and list(order_a) != list(order_b)
    assert 0 < sides_a.sum() < 29
    # The PNG is the image enlarged with nearest neighbour, grey.
    from PIL import Image
    import io
    _, shown = study.shown("alice", 0)
    with Image.open(io.BytesIO(study.png(shown[0][1]))) as picture:
        assert picture.size == (256, 256) and picture.mode == "L"
        assert np.array_equal(np.asarray(picture)[::32, ::32], shown[0][1][..., 0])


def test_a_study_asking_more_real_images_than_a_class_has_is_one_line(generated_digits, tmp_path):
    with pytest.raises(UserError, match="real test images, but the study needs"):
        Study(_settings(generated_digits, tmp_path, trials=60, attention_checks=400), log=lambda *_: None)


def test_answers_are_kept_once_in_order_and_a_torn_line_is_ignored(tmp_path):
    store = AnswerStore(tmp_path)
    assert store.add("alice", 0, {"x": 1}) == 1
    assert store.add("alice", 0, {"x": 2}) == 1  # sent twice: kept once
    with pytest.raises(UserError, match="out of order"):
        store.add("alice", 5, {"x": 3})
    assert store.add("alice", 1, {"x": 4}) == 2
    path = store.path("alice")
    path.write_text(path.read_text() + '{"position": 2, "x"')  # a write cut short
    assert [a["x"] for a in store.answers("alice")] == [1, 4]
    assert store.add("alice", 2, {"x": 5}) == 3
    assert [a["x"] for a in read_answers(path)] == [1, 4, 5]
    assert store.raters() == ["alice"]
    for bad in ("", "a/b", "../x", "x" * 41, "a b"):
        with pytest.raises(UserError, match="rater id"):
            store.path(bad)


def test_a_restarted_server_continues_each_rater_where_they_were(generated_digits, tmp_path):
    settings = _settings(generated_digits, tmp_path)
    study = Study(settings, log=lambda *_: None)
    client = create_app(study, AnswerStore(study.directory), log=lambda *_: None).test_client()
    for position in range(5):
        client.post("/api/answer", json={"rater": "alice", "position": position, "choice": "left"})
    first = client.get("/api/state?rater=alice").get_json()
    restarted = Study(settings, log=lambda *_: None)  # a new process: the same trials from the same settings
    client = create_app(restarted, AnswerStore(restarted.directory), log=lambda *_: None).test_client()
    state = client.get("/api/state?rater=alice").get_json()
    assert state["answered"] == 5 and state["trial"] == first["trial"]
    assert client.get("/api/state?rater=bob").get_json()["answered"] == 0
    assert client.post("/api/answer", json={"rater": "alice", "position": 7, "choice": "left"}).status_code == 409
    assert client.post("/api/answer", json={"rater": "alice", "position": 5, "choice": "up"}).status_code == 400
    assert client.post("/api/answer", json={"rater": "alice", "position": 5, "score": 3}).status_code == 400
    assert client.get("/image/alice/5/0.png").mimetype == "image/png"
    assert client.get("/image/alice/5/2.png").status_code == 404
    assert client.get("/page/../rating.py").status_code == 404


def _post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _get(url):
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def test_many_raters_answering_at_once_over_http_lose_nothing(generated_digits, tmp_path):
    settings = _settings(generated_digits, tmp_path, realism_trials=2)
    study = Study(settings, log=lambda *_: None)
    study.write_description()
    store = AnswerStore(study.directory)
    server = StudyServer(create_app(study, store, log=lambda *_: None), "127.0.0.1", 0).start()
    raters = [f"rater_{i}" for i in range(8)]
    errors = []

    def answer_all(rater):
        try:
            state = _get(f"{server.url}api/state?rater={rater}")
            while not state["done"]:
                trial = state["trial"]
                body = {"rater": rater, "position": trial["position"], "ms": 5}
                body.update({"choice": "right"} if trial["kind"] == "choice" else {"score": 4})
                _post(f"{server.url}api/answer", body)  # every answer sent twice: a double click
                state = _post(f"{server.url}api/answer", body)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(f"{rater}: {e!r}")

    try:
        threads = [threading.Thread(target=answer_all, args=(r,)) for r in raters]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        server.stop()
    assert not errors, errors
    assert store.raters() == raters
    for rater in raters:
        answers = store.answers(rater)
        lines = store.path(rater).read_text().splitlines()
        assert len(lines) == len(answers) == 26, rater
        assert [a["position"] for a in answers] == list(range(26))
        assert sorted(a["trial"] for a in answers) == list(range(26))


def test_the_report_and_reports_section(generated_digits, tmp_path, monkeypatch):
    settings = _settings(generated_digits, tmp_path)
    study = Study(settings, log=lambda *_: None)
    study.write_description()
    store = AnswerStore(study.directory)
    for rater, fooled in (("a", {0}), ("b", {0, 1})):
        for position in range(len(study.trials)):
            trial, sides = study.shown(rater, position)
            names = [what for what, _ in sides]
            wanted = "generated" if trial["kind"] == "pair" and trial["label"] in fooled else "real"
            store.add(rater, position, {"trial": trial["trial"], "kind": trial["kind"], "label": trial["label"],
                                        "picked": wanted, "left": names[0], "right": names[1]})
    lines = []
    summary = report(settings.replace(report=True), log=lines.append)
    # a: 2 of 20, b: 4 of 20 -> 6 of 40. (real, generated) picks per item: class 0's two items (0, 2),
    # agreeing; class 1's two (1, 1), not; classes 2-9's sixteen (2, 0), agreeing -> 18 / 20.
    assert (summary["fooling_rate"]["k"], summary["fooling_rate"]["n"]) == (6, 40)
    assert summary["agreement"]["pairwise"] == pytest.approx((2 * 1 + 2 * 0 + 16 * 1) / 20)
    assert json.loads((study.directory / "report.json").read_text())["raters_kept"] == 2
    assert any("**15.0 %**" in line for line in lines)
    with pytest.raises(UserError, match="no study with these settings"):
        report(settings.replace(report=True, seed=3), log=lines.append)
    assert "Fleiss' kappa" in "\n".join(summary_lines(study_summary(study.directory, 1)))


def test_the_pipeline_report_shows_the_ratings_of_its_experiment(generated_digits, tmp_path, monkeypatch):
    from Pipeline.report import rating_section

    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    assert rating_section("0", "digits") == []
    settings = RatingSettings(dataset="digits", synthetic_dir=str(generated_digits), trials=10,
                              attention_checks=0, port=0)
    study = Study(settings, log=lambda *_: None)
    study.write_description()
    assert str(study.directory).startswith(str(tmp_path / "Experiments" / "Exp_0" / "digits" / "ratings"))
    for position in range(10):
        trial, _ = study.shown("a", position)
        AnswerStore(study.directory).add("a", position, {"trial": trial["trial"], "kind": "pair",
                                                         "label": trial["label"], "picked": "generated"})
    from Pipeline.report import write_report

    text = write_report("0", "digits", "small", "quick", {}, "python reproduce.py").read_text()
    assert "## Human judgement" in text and "**100.0 %**" in text and "10 of 10" in text
    assert math.isclose(wilson_interval(10, 10)[0], 0.722467, abs_tol=1e-6) and "72.2–100.0 %" in text


def test_the_script_serves_until_ctrl_c_and_then_says_where_the_answers_are(generated_digits, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO

    process = subprocess.Popen(
        [sys.executable, str(REPO / "rate_dataset.py"), "--dataset", "digits", "--synthetic_dir", str(generated_digits),
         "--trials", "10", "--port", "0"], cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, SDDG_OUTPUT_ROOT=str(tmp_path), PYTHONUNBUFFERED="1"),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background job ignores SIGINT
    try:
        for line in process.stdout:
            if "study page: http://127.0.0.1:" in line:
                break
        url = line.split("study page: ")[1].split()[0]
        assert _get(f"{url}api/state?rater=zoe")["answered"] == 0
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "stopped; 0 rater(s) have answers in" in out and "Experiments/Exp_0/digits/ratings/" in out
