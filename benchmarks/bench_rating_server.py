"""rate_dataset.py's server under load: the time to save an answer and get the next trial, with raters at once.

Serves a digits study in this process (the generated images: the digits training split, written in
the synthetic folder layout), then R raters in threads answer the whole study over HTTP as fast as
they can (no browser: the server's part alone), each also fetching the trial's images. Prints the
median and 95th percentile time of one answer (POST /api/answer, the answer file replaced under a
lock), of one image, the answers per second, and that no answer was lost.

    python benchmarks/bench_rating_server.py --raters 1 8 32 --trials 100
"""

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from Data.loaders import load_dataset  # noqa: E402
from Data.shards import image_path  # noqa: E402
from Data.synthetic_writer import write_png  # noqa: E402
from Pipeline.rating import AnswerStore, RatingSettings, Study, StudyServer, create_app  # noqa: E402


def _call(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        content = response.read()
    return content if ".png" in url else json.loads(content)


def rate(base, rater, answer_times, image_times):
    state = _call(f"{base}api/state?rater={rater}")
    while not state["done"]:
        trial = state["trial"]
        for src in trial["images"]:
            start = time.perf_counter()
            _call(base.rstrip("/") + src)
            image_times.append(time.perf_counter() - start)
        body = {"rater": rater, "position": trial["position"], "ms": 1}
        body.update({"choice": "left"} if trial["kind"] == "choice" else {"score": 3})
        start = time.perf_counter()
        state = _call(f"{base}api/answer", body)
        answer_times.append(time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raters", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--trials", type=int, default=100)
    args = parser.parse_args()
    splits = load_dataset("digits")
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "generated"
        counts = np.zeros(10, int)
        for x, y in zip(splits.x_train, splits.y_train):
            write_png(image_path(folder, int(y), int(counts[y])), x, channels=1)
            counts[y] += 1
        settings = RatingSettings(dataset="digits", synthetic_dir=str(folder), trials=args.trials,
                                  ratings_dir=str(Path(root) / "ratings"), port=0)
        study = Study(settings, log=lambda *_: None)
        study.write_description()
        total = len(study.trials)
        for n in args.raters:
            store = AnswerStore(Path(root) / "ratings" / f"run{n}")
            server = StudyServer(create_app(study, store, log=lambda *_: None), "127.0.0.1", 0).start()
            answer_times, image_times = [], []
            threads = [threading.Thread(target=rate, args=(server.url, f"r{i}", answer_times, image_times))
                       for i in range(n)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            server.stop()
            saved = sum(len(store.answers(f"r{i}")) for i in range(n))
            q = lambda v, p: 1000 * np.percentile(v, p)  # noqa: E731
            print(f"{n:3d} raters x {total} trials: answer median {q(answer_times, 50):.1f} ms, p95 "
                  f"{q(answer_times, 95):.1f} ms; image median {q(image_times, 50):.1f} ms; "
                  f"{len(answer_times) / wall:.0f} answers/s; saved {saved} of {n * total}", flush=True)
            assert saved == n * total


if __name__ == "__main__":
    main()
