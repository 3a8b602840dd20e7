"""Human judgement of a synthetic data set: a local "real or generated?" study page and its report.

`run(settings)` serves one study page (Flask, on 127.0.0.1 by default) until
Ctrl-C; `run(settings.replace(report=True))` prints and writes its report.

The study: `trials` two-alternative forced choices (a real image of the
`split` and a generated image of the same class side by side, sides drawn at
random per rater, "which one is real?"), `attention_checks` pairs whose other
image is pure noise (the answer is known), and optionally `realism_trials`
single images (half real, half generated) rated 1-5. Every rater answers the
same trials, each in their own seeded order, so that agreement between raters
is measured on the same items. Images are enlarged by an integer factor with
nearest neighbour (each pixel a square block; the page states the factor).

Files (`ratings_dir`, default Experiments/Exp_{exp}/{dataset}/ratings/):

    {study}/study.json              the trials (kind, class) and the settings that define them
    {study}/answers/{rater}.jsonl   one line per answer, written as it is given
    {study}/report.json             the figures of the last --report

`{study}` is `{synthetic folder name}-{hash}` of the settings that define the
trials (folder, dataset, split, trial counts, seed): another folder or seed is
another study. An answer is added under a lock on the rater's file and the file
replaced atomically (`Utils.io`), so a killed server keeps every answer given,
several raters answer at once without losing any, and an answer sent twice (a
double click, a resent request) is kept once. A rater who reloads the page, or
comes back after a restart, continues at their first unanswered trial.

The report (`Metrics/rating_stats.py` documents each figure and the exclusion
rule): the fooling rate (the share of pair trials in which the generated image
was picked as real; 50 % is indistinguishable) overall and per class with 95 %
Wilson intervals, raters and trials kept and excluded, and the agreement between
raters (pairwise agreement and Fleiss' kappa).

Example:
    >>> settings = RatingSettings(dataset="digits", synthetic_dir="Data/Synthetic/Exp_0/digits", trials=40)
    >>> run(settings)                               # serves http://127.0.0.1:8765/ until Ctrl-C
    >>> run(settings.replace(report=True))          # prints the figures, writes report.json
"""

import datetime
import hashlib
import io
import json
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from Pipeline.common_settings import (accept_unverified_setting, data_dir_setting, dataset_setting, dataset_spec,
                                      experiment_setting, image_size_setting, load_real)
from Utils.cli import UserError, existing_folder, folder, non_negative_int, port, positive_int
from Utils.settings import ADDED, REQUIRED, Settings, setting

SCRIPT = "rate_dataset.py"
PAGE_DIR = Path(__file__).resolve().parent / "rating_page"
STUDY_FILE = "study.json"
REPORT_JSON = "report.json"
ANSWERS = "answers"
RATER_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,40}")
SPLITS = ("train", "val", "test")
DEFAULT_MAX_FAILED_CHECKS = 1
_STUDY = "the study (each changes the trials: another study folder)"
_SERVER = "the page"


@dataclass(frozen=True, kw_only=True)
class RatingSettings(Settings):
    """Every flag of rate_dataset.py."""

    dataset: str = dataset_setting(REQUIRED, group=ADDED)
    synthetic_dir: str = setting(None, type=existing_folder,
                                 help="the generated images: a folder of class sub-folders (default: ours, "
                                      "Data/Synthetic/Exp_{exp}/{dataset})")
    exp: str = experiment_setting(group=ADDED)
    data_dir: str = data_dir_setting()
    image_size: int = image_size_setting()
    accept_unverified_data: bool = accept_unverified_setting()
    report: bool = setting(False, help="print the study's report (fooling rate, intervals, raters kept, "
                                       "agreement) and write report.json; serves nothing")
    ratings_dir: str = setting(None, type=folder,
                               help="where studies and answers are kept (default Experiments/Exp_{exp}/{dataset}/"
                                    "ratings)")
    max_failed_checks: int = setting(DEFAULT_MAX_FAILED_CHECKS, type=non_negative_int,
                                     help="a rater failing more attention checks than this is excluded from "
                                          "the report")
    trials: int = setting(40, type=positive_int, group=_STUDY,
                          help="real-vs-generated pairs per rater, balanced over the classes")
    attention_checks: int = setting(4, type=non_negative_int, group=_STUDY,
                                    help="pairs of a real image and pure noise mixed in (answer known)")
    realism_trials: int = setting(0, type=non_negative_int, group=_STUDY,
                                  help="single images (half real, half generated) rated 1-5 for realism "
                                       "(0: none)")
    split: str = setting("test", choices=SPLITS, group=_STUDY, help="the real split the real images come from")
    seed: int = setting(0, type=non_negative_int, group=_STUDY,
                        help="which images, classes of the checks, noise, and each rater's order and sides")
    host: str = setting("127.0.0.1", group=_SERVER,
                        help="address to listen on (0.0.0.0: every interface, for raters on other machines)")
    port: int = setting(8765, type=port, group=_SERVER, help="port to listen on (0: any free port)")
    display_size: int = setting(256, type=positive_int, group=_SERVER,
                                help="images are enlarged by the integer factor that brings them nearest to "
                                     "this many pixels (at least 1x)")

    def __post_init__(self):
        super().__post_init__()
        if not self.host.strip() or any(c.isspace() for c in self.host):
            raise UserError(f"--host: expected an address such as 127.0.0.1, got {self.host!r}")

    def measured_folder(self):
        """The generated images rated: synthetic_dir, else our Data/Synthetic/Exp_{exp}/{dataset}."""
        from Utils.paths import synthetic_dir

        return Path(self.synthetic_dir) if self.synthetic_dir else synthetic_dir(self.exp, dataset_spec(self).name)

    def definition(self):
        """What the trials depend on (recorded in study.json; its hash names the study folder)."""
        return {"dataset": dataset_spec(self).name, "synthetic_dir": str(self.measured_folder().resolve()),
                "split": self.split, "trials": self.trials, "attention_checks": self.attention_checks,
                "realism_trials": self.realism_trials, "seed": self.seed, "image_size": self.image_size}

    def study_dir(self):
        """ratings_dir / '{folder name}-{hash of the definition}'."""
        from Utils.paths import experiment_dir

        root = Path(self.ratings_dir) if self.ratings_dir else experiment_dir(self.exp, dataset_spec(self).name) / "ratings"
        digest = hashlib.sha256(json.dumps(self.definition(), sort_keys=True).encode()).hexdigest()[:8]
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.measured_folder().resolve().name).strip("._") or "folder"
        return root / f"{base}-{digest}"


# ------------------------------------------------------------------ the study ----

def scale_for(native_size, display_size):
    """The integer nearest-neighbour enlargement shown: the one nearest display_size, at least 1."""
    return max(1, int(round(display_size / native_size)))


class Study:
    """The trials of one study and their images (built from the settings; same settings, same trials).

    Attributes:
        trials: [{"trial", "kind" ("pair", "check", "single"), "label", "real" | "generated" | "noise"
                 (indices into the image arrays), "shown" (singles)}], pairs first, then checks, then singles.
        real, generated, noise: uint8 (N, S, S, 3) arrays.
    """

    def __init__(self, settings, log=print):
        from Data.balance import per_class_counts
        from Data.synthetic import format_report, load_image_folder

        self.settings = settings
        spec = dataset_spec(settings)
        self.spec = spec
        self.folder = settings.measured_folder()
        if not self.folder.is_dir():
            raise UserError(f"no generated images at {self.folder}: generate them first (generate_dataset.py) "
                            f"or pass --synthetic_dir")
        C = spec.num_classes
        rng = np.random.default_rng([settings.seed, 0x5EA1])
        pair_counts = per_class_counts(settings.trials, C)
        single_generated = (settings.realism_trials + 1) // 2
        single_real = settings.realism_trials // 2
        log(f"reading {settings.trials + single_generated} generated images from {self.folder} ...")
        x_gen, y_gen, report = load_image_folder(self.folder, spec, take=settings.trials + single_generated,
                                                 seed=settings.seed)
        for line in format_report(report)[1:]:
            log(line)
        splits = load_real(settings)
        x_real, y_real = getattr(splits, f"x_{settings.split}"), getattr(splits, f"y_{settings.split}")

        check_labels = (rng.permutation(np.resize(np.arange(C), settings.attention_checks))
                        if settings.attention_checks else np.zeros(0, np.int64))
        real_single_labels = np.repeat(np.arange(C), per_class_counts(single_real, C))
        needed = np.array(pair_counts) + np.bincount(check_labels, minlength=C) \
            + np.bincount(real_single_labels, minlength=C)
        real_pick = {}
        for c in range(C):
            pool = np.flatnonzero(y_real == c)
            if len(pool) < needed[c]:
                raise UserError(f"class {c} ({spec.label_names[c]}) has {len(pool)} real {settings.split} images, "
                                f"but the study needs {needed[c]} (fewer --trials, --attention_checks or "
                                f"--realism_trials, or another --split)")
            real_pick[c] = list(rng.permutation(pool)[:needed[c]])

        real_images, generated_images, trials = [], [], []

        def add_real(c):
            real_images.append(x_real[real_pick[c].pop()])
            return len(real_images) - 1

        generated_by_class = {c: list(np.flatnonzero(y_gen == c)) for c in range(C)}
        for c in range(C):
            for _ in range(pair_counts[c]):
                generated_images.append(x_gen[generated_by_class[c].pop(0)])
                trials.append({"kind": "pair", "label": c, "real": add_real(c),
                               "generated": len(generated_images) - 1})
        noise = []
        for c in check_labels:
            noise.append(_noise_image(rng, spec.image_size, spec.channels))
            trials.append({"kind": "check", "label": int(c), "real": add_real(int(c)), "noise": len(noise) - 1})
        singles = [("generated", c) for c in range(C) for _ in generated_by_class[c]]
        singles += [("real", int(c)) for c in real_single_labels]
        for shown, c in singles:
            if shown == "generated":
                generated_images.append(x_gen[generated_by_class[c].pop(0)])
                trials.append({"kind": "single", "label": c, "shown": shown, "generated": len(generated_images) - 1})
            else:
                trials.append({"kind": "single", "label": c, "shown": shown, "real": add_real(c)})
        for i, trial in enumerate(trials):
            trial["trial"] = i
        self.trials = trials
        empty = np.zeros((0, spec.image_size, spec.image_size, 3), np.uint8)
        self.real = np.stack(real_images) if real_images else empty
        self.generated = np.stack(generated_images) if generated_images else empty
        self.noise = np.stack(noise) if noise else empty
        self.scale = scale_for(spec.image_size, settings.display_size)
        self.directory = settings.study_dir()

    def description(self):
        """study.json's content."""
        from Data.synthetic_writer import read_manifest

        manifest = read_manifest(self.folder) or {}
        return {"definition": self.settings.definition(), "label_names": list(self.spec.label_names),
                "image_size": self.spec.image_size, "scale": self.scale, "total": len(self.trials),
                "trials": [{k: t[k] for k in ("trial", "kind", "label") if k in t}
                           | ({"shown": t["shown"]} if "shown" in t else {}) for t in self.trials],
                "generator_settings": manifest.get("settings")}

    def write_description(self):
        from Utils.io import atomic_write_json, read_json

        path = self.directory / STUDY_FILE
        description = self.description()
        if read_json(path) != description:
            atomic_write_json(path, description)
        return path

    def plan(self, rater):
        """(order of trial ids, left-is-the-real-image flags) of one rater: seeded by the seed and the rater id."""
        rater_key = int(hashlib.sha256(rater.encode()).hexdigest()[:15], 16)
        rng = np.random.default_rng([self.settings.seed, rater_key])
        return rng.permutation(len(self.trials)), rng.integers(0, 2, len(self.trials)).astype(bool)

    def shown(self, rater, position):
        """(trial, [(what, image) left to right]) at a rater's position; what: real, generated or noise."""
        order, left_real = self.plan(rater)
        trial = self.trials[int(order[position])]
        if trial["kind"] == "single":
            what = trial["shown"]
            return trial, [(what, self._image(what, trial[what]))]
        other = "generated" if trial["kind"] == "pair" else "noise"
        sides = [("real", self._image("real", trial["real"])), (other, self._image(other, trial[other]))]
        return trial, sides if left_real[position] else sides[::-1]

    def _image(self, what, index):
        return {"real": self.real, "generated": self.generated, "noise": self.noise}[what][index]

    def png(self, image):
        """The PNG bytes of an image enlarged `scale` times with nearest neighbour.

        Grey when its three channels are equal; a generated image of a grey dataset with colour in it
        keeps the colour (it is a tell a rater may see).
        """
        from PIL import Image

        big = np.repeat(np.repeat(image, self.scale, axis=0), self.scale, axis=1)
        grey = bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())
        picture = Image.fromarray(big[..., 0] if grey else big)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return buffer.getvalue()


def _noise_image(rng, size, channels):
    noise = rng.integers(0, 256, (size, size, 1 if channels == 1 else 3), dtype=np.uint8)
    return np.repeat(noise, 3, axis=-1) if channels == 1 else noise


# ---------------------------------------------------------------- the answers ----

def check_rater(rater):
    """The rater id, or a UserError: 1-40 letters, digits, '-' or '_' (it names a file)."""
    if not isinstance(rater, str) or not RATER_PATTERN.fullmatch(rater):
        raise UserError(f"a rater id is 1-40 letters, digits, '-' or '_', got {rater!r}")
    return rater


class AnswerStore:
    """Each rater's answers, one JSON line per answer in {study}/answers/{rater}.jsonl."""

    def __init__(self, directory):
        self.directory = Path(directory) / ANSWERS

    def path(self, rater):
        return self.directory / f"{check_rater(rater)}.jsonl"

    def answers(self, rater):
        """The rater's answers in order, one per position (a torn last line or a repeated position is ignored)."""
        return read_answers(self.path(rater))

    def add(self, rater, position, answer):
        """Adds the answer at `position` when it is the rater's next; returns the number answered after.

        An answer for a position already answered (sent twice) changes nothing; one beyond
        the next (a stale page) is refused with a UserError.
        """
        from Utils.io import atomic_write_text, file_lock

        path = self.path(rater)
        with file_lock(path):
            lines = _whole_lines(path)
            answered = len(_parse(lines))
            if position < answered:
                return answered
            if position > answered:
                raise UserError(f"rater {rater} has answered {answered} trials; an answer for trial "
                                f"{position + 1} is out of order (reload the page)")
            lines.append(json.dumps({"position": position, **answer}, sort_keys=True))
            atomic_write_text(path, "".join(line + "\n" for line in lines))
            return answered + 1

    def raters(self):
        return sorted(p.stem for p in self.directory.glob("*.jsonl") if RATER_PATTERN.fullmatch(p.stem))


def _whole_lines(path):
    if not Path(path).exists():
        return []
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    return [line for line in lines[:-1] if line.strip()]  # the part after the last newline is torn


def _parse(lines):
    answers = []
    for line in lines:
        try:
            answer = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(answer, dict) and answer.get("position") == len(answers):
            answers.append(answer)
    return answers


def read_answers(path):
    """A rater's answers from their answer file (see `AnswerStore.answers`)."""
    return _parse(_whole_lines(path))


# ------------------------------------------------------------------ the server ----

def create_app(study, store, log=print):
    """The Flask app of one study: the page, its state and answers (JSON), and the images.

    Routes: `/` (the page), `/page/<file>` (its script and style), `/api/study`,
    `/api/state?rater=ID`, `POST /api/answer` ({rater, position, choice: "left"|"right"} or
    {rater, position, score: 1..5}; `ms`: the time to answer), `/image/<rater>/<position>/<slot>.png`.
    Image names say nothing about which image is real.
    """
    from flask import Flask, Response, jsonify, request, send_from_directory

    app = Flask(__name__, static_folder=None)
    spec = study.spec
    study_id = study.directory.name
    lock = threading.Lock()
    started = set()

    def state(rater):
        answered = len(store.answers(rater))
        out = {"rater": rater, "answered": answered, "total": len(study.trials), "study": study_id}
        if answered >= len(study.trials):
            return {**out, "done": True, "trial": None}
        trial, sides = study.shown(rater, answered)
        out["trial"] = {"position": answered, "kind": "rating" if trial["kind"] == "single" else "choice",
                        "label": trial["label"], "label_name": spec.label_names[trial["label"]],
                        "images": [f"/image/{rater}/{answered}/{slot}.png?study={study_id}"
                                   for slot in range(len(sides))]}
        return {**out, "done": False}

    def rater_from(value):
        try:
            return check_rater(value), None
        except UserError as e:
            return None, (jsonify(error=str(e)), 400)

    @app.get("/")
    def page():
        return send_from_directory(PAGE_DIR, "index.html")

    @app.get("/page/<path:name>")
    def page_file(name):
        return send_from_directory(PAGE_DIR, name)

    @app.get("/api/study")
    def describe():
        return jsonify(dataset=spec.name, image_size=spec.image_size, scale=study.scale,
                       shown_size=spec.image_size * study.scale, total=len(study.trials), study=study_id,
                       realism=any(t["kind"] == "single" for t in study.trials))

    @app.get("/api/state")
    def get_state():
        rater, error = rater_from(request.args.get("rater"))
        return error or jsonify(state(rater))

    @app.post("/api/answer")
    def answer():
        body = request.get_json(silent=True) or {}
        rater, error = rater_from(body.get("rater"))
        if error:
            return error
        position = body.get("position")
        if not isinstance(position, int) or isinstance(position, bool) or not 0 <= position < len(study.trials):
            return jsonify(error=f"position must be a trial number in 0..{len(study.trials) - 1}"), 400
        if position < len(store.answers(rater)):  # sent twice (a double click, a resent request): kept once
            return jsonify(state(rater))
        trial, sides = study.shown(rater, position)
        ms = body.get("ms")
        record = {"trial": trial["trial"], "kind": trial["kind"], "label": trial["label"],
                  "ms": int(ms) if isinstance(ms, (int, float)) and not isinstance(ms, bool) and 0 <= ms < 1e9
                  else None,
                  "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")}
        if trial["kind"] == "single":
            score = body.get("score")
            if not isinstance(score, int) or isinstance(score, bool) or not 1 <= score <= 5:
                return jsonify(error="this trial takes a realism score 1..5"), 400
            record |= {"shown": trial["shown"], "score": score}
        else:
            choice = body.get("choice")
            if choice not in ("left", "right"):
                return jsonify(error="this trial takes a choice: left or right"), 400
            record |= {"left": sides[0][0], "right": sides[1][0], "choice": choice,
                       "picked": sides[0 if choice == "left" else 1][0]}
        try:
            answered = store.add(rater, position, record)
        except UserError as e:
            return jsonify(error=str(e), state=state(rater)), 409
        with lock:
            if rater not in started:
                started.add(rater)
                log(f"rater {rater}: answering")
        if answered == len(study.trials) and position == answered - 1:
            log(f"rater {rater}: finished all {answered} trials")
        return jsonify(state(rater))

    @app.get("/image/<rater>/<int:position>/<int:slot>.png")
    def image(rater, position, slot):
        rater, error = rater_from(rater)
        if error:
            return error
        if not 0 <= position < len(study.trials):
            return jsonify(error="no such trial"), 404
        _, sides = study.shown(rater, position)
        if not 0 <= slot < len(sides):
            return jsonify(error="no such image"), 404
        return Response(study.png(sides[slot][1]), mimetype="image/png",
                        headers={"Cache-Control": "private, max-age=86400"})

    return app


class StudyServer:
    """The study's web server in a background thread (werkzeug's threaded server: raters answer at once).

        server = StudyServer(app, "127.0.0.1", 0).start()   # server.url: http://127.0.0.1:PORT/
        ...
        server.stop()
    """

    def __init__(self, app, host, port_number):
        import logging

        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        try:
            self.server = make_server(host, port_number, app, threaded=True)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port_number}: {e.strerror or e} "
                            f"(another --port, or 0 for any free one)") from None
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self):
        host = self.server.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.server.server_port}/"

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.thread.join(timeout=10)


# ----------------------------------------------------------------- the report ----

def load_study(study_dir):
    """(study.json's dict, {rater: answers}) of a study folder; a UserError when it holds no study."""
    from Utils.io import read_json

    description = read_json(Path(study_dir) / STUDY_FILE)
    if not isinstance(description, dict) or "trials" not in description:
        raise UserError(f"no study in {study_dir} (start it first: python {SCRIPT} --dataset ... without --report)")
    store = AnswerStore(study_dir)
    return description, {rater: store.answers(rater) for rater in store.raters()}


def study_summary(study_dir, max_failed_checks):
    """The report's figures (`Metrics.rating_stats.summarize`) and what the study was."""
    from Metrics.rating_stats import summarize

    description, answers = load_study(study_dir)
    summary = summarize(answers, description["total"], max_failed_checks)
    counts = {kind: sum(t["kind"] == kind for t in description["trials"]) for kind in ("pair", "check", "single")}
    return {"study": Path(study_dir).name, "definition": description["definition"],
            "label_names": description["label_names"], "scale": description["scale"],
            "image_size": description["image_size"], "trial_counts": counts, **summary}


def _pct(value):
    return "–" if value is None else f"{100 * value:.1f} %"


def _interval(p):
    return "–" if p["low"] is None else f"{100 * p['low']:.1f}–{100 * p['high']:.1f} %"


def summary_lines(summary, heading="###"):
    """Markdown lines of one study's report (rate_dataset.py --report and REPORT.md)."""
    d, counts = summary["definition"], summary["trial_counts"]
    fool, agree = summary["fooling_rate"], summary["agreement"]
    names = summary["label_names"]
    lines = [f"{heading} Human judgement: `{d['synthetic_dir']}`", "",
             f"Study `{summary['study']}`: {counts['pair']} real-vs-generated pairs ({d['split']} split), "
             f"{counts['check']} attention checks (real vs noise), {counts['single']} realism ratings per rater; "
             f"images enlarged {summary['scale']}x from {summary['image_size']} px (nearest neighbour).", ""]
    if not summary["raters"]:
        return lines + ["No answers yet.", ""]
    lines += [f"- **Fooling rate** (the generated image picked as the real one; 50 % = indistinguishable): "
              f"**{_pct(fool['rate'])}** (95 % Wilson interval {_interval(fool)}), {fool['k']} of {fool['n']} "
              f"pair trials",
              f"- Raters: {summary['raters_kept']} kept, {summary['raters_excluded']} excluded "
              f"({summary['excluded_failed_checks']} failed more than {summary['max_failed_checks']} attention "
              f"check(s), {summary['excluded_incomplete']} incomplete); pair trials: {summary['pair_trials_kept']} "
              f"kept, {summary['pair_trials_excluded']} excluded"]
    if agree["items"]:
        per_item = "/".join(map(str, agree["raters_per_item"]))
        kappa = "undefined (every answer alike)" if agree["fleiss_kappa"] is None else f"{agree['fleiss_kappa']:.3f}"
        lines.append(f"- Agreement over the {agree['items']} pairs answered by {per_item} kept raters: "
                     f"pairwise {_pct(agree['pairwise'])}, Fleiss' kappa {kappa}")
    else:
        lines.append("- Agreement: needs two kept raters")
    realism = summary["realism"]
    if realism["real"]["n"] or realism["generated"]["n"]:
        def mean(r):
            if r["mean"] is None:
                return "–"
            return f"{r['mean']:.2f}" + (f" ({r['low']:.2f}–{r['high']:.2f})" if r["low"] is not None else "") \
                + f", n = {r['n']}"
        lines.append(f"- Realism 1-5 (mean, 95 % interval): real {mean(realism['real'])}; generated "
                     f"{mean(realism['generated'])}")
    lines += ["", "| class | fooling rate | 95 % interval | trials |", "| --- | --- | --- | --- |"]
    for label, p in summary["fooling_rate_per_class"].items():
        name = names[int(label)]
        shown = str(label) if name == str(label) else f"{label} ({name})"
        lines.append(f"| {shown} | {_pct(p['rate'])} | {_interval(p)} | {p['n']} |")
    lines += ["", "| rater | kept | failed checks | answered |", "| --- | --- | --- | --- |"]
    for rater, s in summary["raters"].items():
        lines.append(f"| {rater} | {'yes' if s['kept'] else 'no: ' + s['reason']} | "
                     f"{s['failed_checks']} of {s['checks']} | {s['answered']} |")
    return lines + [""]


def study_dirs(ratings_dir):
    """The study folders under a ratings folder (those holding a study.json), sorted."""
    return sorted(p.parent for p in Path(ratings_dir).glob(f"*/{STUDY_FILE}")) if Path(ratings_dir).is_dir() else []


def report(settings, log=print):
    """Prints the study's report and writes report.json beside its answers; returns the summary."""
    from Utils.io import atomic_write_json

    directory = settings.study_dir()
    if not (directory / STUDY_FILE).exists():
        others = [p.name for p in study_dirs(directory.parent)]
        hint = f"; studies there: {', '.join(others)}" if others else ""
        raise UserError(f"no study with these settings in {directory.parent} (the study flags must be those the "
                        f"page was served with{hint})")
    summary = study_summary(directory, settings.max_failed_checks)
    atomic_write_json(directory / REPORT_JSON, summary)
    for line in summary_lines(summary, heading="#"):
        log(line)
    log(f"(written to {directory / REPORT_JSON})")
    return summary


def run(settings, log=print, serve=True):
    """Serves the study page until Ctrl-C (or with report=True, prints the report). Returns the study folder.

    serve=False builds the study and writes study.json without serving (tests, scripts).
    """
    if settings.report:
        report(settings, log=log)
        return settings.study_dir()
    study = Study(settings, log=log)
    path = study.write_description()
    store = AnswerStore(study.directory)
    if not serve:
        return study.directory
    server = StudyServer(create_app(study, store, log=log), settings.host, settings.port)
    counts = {kind: sum(t["kind"] == kind for t in study.trials) for kind in ("pair", "check", "single")}
    log(f"study {study.directory.name}: {counts['pair']} pairs, {counts['check']} attention checks, "
        f"{counts['single']} realism ratings per rater; answers in {store.directory}")
    try:
        log(f"study page: {server.url}  (each rater opens it and enters an id; Ctrl-C stops, answers are kept)")
        sys.stdout.flush()  # whoever started the server (a person, a test) reads the address now
        server.server.serve_forever()  # werkzeug's returns on Ctrl-C (it catches KeyboardInterrupt itself)
    except KeyboardInterrupt:
        pass
    finally:
        server.server.server_close()
    log(f"stopped; {len(store.raters())} rater(s) have answers in {store.directory}; "
        f"python {SCRIPT} --report with the same flags prints the figures ({path.name} records the study)")
    return study.directory
