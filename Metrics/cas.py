"""Classification Accuracy Score (CAS): the results table and its plot.

A CAS result is the real-test accuracy of a ResNet20 trained on one training
set ("real", or synthetic data of x1..xN times the real training-set size);
`classifier_training.py` computes it. Results live in the paper's file,
`CAS Results/test_accuracies_exp{exp}.json`:

    {"retinamnist": {"real": {"top1": 0.47, "top5": 1.0, "top_k": 5, ...},
                     "x1":   {...}, "x4": {...},
                     "sdxl_x1": {...}},           # other folders: "<name>_x<N>"
     "cifar10": {...}}

Each run's entry is replaced whole (under a file lock, written atomically), so
two runs finishing together both keep their results and a rerun leaves no
stale fields behind.

The plot, `CAS Results/cas_{dataset}_exp{exp}.png`, draws our x1..xN top-1
(solid) and top-5 (dashed) against horizontal lines for the real-data
classifier, other folders' "<name>_x<N>" runs as their own curves, and, for the
paper's six datasets, the published curve and real line in grey
(`Utils.paths.PUBLISHED_CAS_JSON`, when that file exists).

A record is the test evaluation plus what the classifier was trained on and
how (`cas_record`, from the run's `run.json`).

Example:
    >>> record_cas(0, "retinamnist", "x1", cas_record(evaluate_classifier(model, x_test, y_test, names), run))
    >>> plot_cas(0, "retinamnist")
    PosixPath('CAS Results/cas_retinamnist_exp0.png')
"""

import re
from collections import defaultdict

from Metrics.errors import MetricsError
from Utils.io import atomic_path, atomic_write_json, file_lock, read_json
from Utils.paths import PUBLISHED_CAS_JSON, cas_results_json, dataset_folder, results_dir

_MULTIPLE = re.compile(r"^(?:(?P<prefix>.+)_)?x(?P<n>\d+)$")


def run_key_for(take=None, synthetic=False, folder_name=None):
    """The results key of a run: "real", "x{take}", or "{folder_name}_x{take}" / "{folder_name}_all".

    Example:
        >>> run_key_for(), run_key_for(4, True), run_key_for(2, True, "sdxl")
        ('real', 'x4', 'sdxl_x2')
    """
    if not synthetic:
        return "real"
    if folder_name is None:
        return f"x{take}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(folder_name)).strip("-") or "folder"
    return f"{slug}_x{take}" if take is not None else f"{slug}_all"


def cas_record(evaluation, run):
    """The CAS entry of one run: the test `evaluation` (`Models.classifier.evaluate_classifier`)
    plus the training facts of `run` (the run.json metadata: n_train, epochs, seed, config, source).

    Pipelines decide whether a recorded run is the one they would make from
    `max_epochs`, `batch_size`, `initial_filters` and `seed`.
    """
    cfg = run.get("config", {})
    record = {**evaluation,
              "n_train": run.get("n_train"), "epochs_run": run.get("epochs_run"),
              "best_epoch": run.get("best_epoch"), "seed": run.get("seed"),
              "classifier": cfg.get("classifier"), "initial_filters": cfg.get("initial_filters"),
              "batch_size": cfg.get("batch_size"), "max_epochs": cfg.get("epochs"),
              "source": run.get("source"), "take": run.get("take")}
    for key in ("data_verification", "train_subset", "conditioning"):
        if key in run:
            record[key] = run[key]
    if "resize_method" in run:
        record["resize_method"] = run["resize_method"]
        record["synthetic_report"] = run.get("synthetic_report")
    return record


def short_report(report, keep=20):
    """A synthetic folder's report (`Data.synthetic.load_image_folder`) for a record: lists longer
    than `keep` cut to `keep` entries, their full length kept as `{key}_count`."""
    short = {}
    for key, value in report.items():
        if isinstance(value, list) and len(value) > keep:
            short[key] = value[:keep]
            short[f"{key}_count"] = len(value)
        else:
            short[key] = value
    return short


def record_cas(exp, dataset, run_key, result):
    """Stores `result` as CAS Results/test_accuracies_exp{exp}.json[dataset][run_key].

    The entry is replaced whole; every other dataset and run is kept. Safe
    when several processes record at once (a file lock, then an atomic write).
    """
    path = cas_results_json(exp)
    with file_lock(path):
        table = read_json(path, default={})
        if not isinstance(table, dict):
            raise MetricsError(f"{path} is not a CAS results table (expected a JSON object)")
        entry = table.get(dataset)
        table[dataset] = {**(entry if isinstance(entry, dict) else {}), run_key: result}
        atomic_write_json(path, table)
    return path


def load_cas(exp, dataset=None):
    """The CAS table of experiment `exp` (or one dataset's runs); {} when nothing is recorded."""
    table = read_json(cas_results_json(exp), default={})
    return table if dataset is None else table.get(dataset, {})


def published_cas(dataset):
    """The paper's CAS runs for `dataset` ({"real": {"top1", "top5"}, "x1": ...}); {} when unknown."""
    published = read_json(PUBLISHED_CAS_JSON, default={}) if PUBLISHED_CAS_JSON.exists() else {}
    return published.get("cas", {}).get(dataset, {})


def _curves(runs):
    """{prefix: [(n, top1, top5), ...] sorted by n} for the "x<N>" / "<prefix>_x<N>" runs."""
    curves = defaultdict(list)
    for key, value in runs.items():
        match = _MULTIPLE.match(key)
        if match and isinstance(value, dict) and "top1" in value:
            curves[match["prefix"] or ""].append((int(match["n"]), value["top1"], value.get("top5")))
    return {prefix: sorted(points) for prefix, points in curves.items()}


def plot_cas(exp, dataset, floor=None):
    """Draws the CAS curves of one dataset into CAS Results/cas_{dataset}_exp{exp}.png; returns the path.

    floor: optional top-1 of always answering the majority class of the real test split,
    drawn as a black dotted line (the pipeline report passes it).
    """
    import matplotlib.pyplot as plt

    fig = cas_figure(exp, dataset, floor=floor)
    path = results_dir() / f"cas_{dataset_folder(dataset)}_exp{exp}.png"
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path


def cas_figure(exp, dataset, floor=None):
    """The matplotlib Figure that `plot_cas` saves (its legend names every curve drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_cas(exp, dataset)
    if not runs:
        raise MetricsError(f"no CAS results for {dataset} in {cas_results_json(exp)}")
    ours = _curves(runs)
    paper = published_cas(dataset)
    paper_curve = _curves(paper).get("", [])
    all_n = [n for points in [*ours.values(), paper_curve] for n, _, _ in points] or [1, 10]
    x_range = (min(1, min(all_n)) - 0.3, max(max(all_n), 1) + 0.3)

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    # C0 and C3 are ours (synthetic, real); other folders take the remaining colours.
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = iter([c for i, c in enumerate(cycle) if i not in (0, 3)])

    def curve(points, label, color, **style):
        ns = [n for n, _, _ in points]
        ax.plot(ns, [t1 for _, t1, _ in points], "o-", color=color, label=f"{label} top-1", **style)
        top5 = [(n, t5) for n, _, t5 in points if t5 is not None]
        if top5:
            ax.plot(*zip(*top5), "s--", color=color, alpha=0.7, label=f"{label} top-5", **style)

    def real_line(entry, label, color, **style):
        ax.axhline(entry["top1"], color=color, linestyle=":", label=f"{label} top-1 ({entry['top1']:.1%})", **style)
        if entry.get("top5") is not None:
            ax.axhline(entry["top5"], color=color, linestyle="-.", alpha=0.6,
                       label=f"{label} top-5 ({entry['top5']:.1%})", **style)

    if paper_curve:
        curve(paper_curve, "paper, synthetic", "0.6", linewidth=1)
    if "real" in paper:
        real_line(paper["real"], "paper, real", "0.6", linewidth=1)
    if "" in ours:
        curve(ours[""], "ours, synthetic", "C0", linewidth=2)
    if isinstance(runs.get("real"), dict) and "top1" in runs["real"]:
        real_line(runs["real"], "ours, real", "C3", linewidth=1.5)
    for prefix in sorted(p for p in ours if p):
        curve(ours[prefix], prefix, next(colors, "k"), linewidth=1.5)
    if floor is not None:
        ax.axhline(floor, color="k", linestyle=(0, (1, 3)), linewidth=1,
                   label=f"majority-class floor ({floor:.1%})")

    ax.set_xlim(*x_range)
    ax.set_xticks(range(1, int(x_range[1]) + 1))
    ax.set_xlabel("synthetic training set size (x the real training set)")
    ax.set_ylabel("accuracy on the real test set")
    ax.set_ylim(0, 1.02)
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.set_title(f"CAS, ResNet20: {dataset}, Exp {exp}")
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    return fig
