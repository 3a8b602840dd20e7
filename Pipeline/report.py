"""REPORT.md of a pipeline run: what came out, beside the paper's figures, and how it was made.

`write_report` gathers what the stages left behind and writes
`Experiments/Exp_{exp}/{dataset}/REPORT.md` with its PNG figures in a
`figures/` folder beside it (copies, so the folder can be shared alone):

1. the CAS table (ours: real and x1..xN, top-1 / top-5) beside the paper's
   published row (`Utils.paths.PUBLISHED_CAS_JSON`, when present) and the
   majority-class floor of the real test split, and the CAS curve
   (`Metrics.cas.plot_cas`);
2. the stage table (after the class encoder / after fine-tuning, without and
   with tuned settings) beside the paper's;
3. the two tuning studies: trial counts, search space, winner, history plots;
4. the settings the final dataset was generated with;
5. a grid of real and generated samples per class, a real-vs-generated
   comparison per class with upscaled tiles, and for grey datasets the
   share of colour-speckled pixels (`Metrics.speckle`);
6. quality metrics (`CAS Results/quality_exp{exp}.json`) when computed;
   human judgement (rate_dataset.py's studies in `Experiments/Exp_{exp}/{dataset}/ratings/`) when
   raters answered one;
7. the exact commands of every stage, their time, and the software versions.

Example:
    >>> write_report(exp=0, dataset="digits", preset="tiny", budget="quick",
    ...              stage_log=read_stage_log(0, "digits"), command="python reproduce.py")
    PosixPath('Experiments/Exp_0/digits/REPORT.md')
"""

import datetime
import shutil

from pathlib import Path

import numpy as np

from Utils.io import atomic_path, atomic_write_text, read_json
from Utils.runtime import software_versions
from Utils.paths import (PUBLISHED_CAS_JSON, cas_results_json, experiment_dir,
                         pipeline_results_json, quality_results_json, synthetic_dir)

REPORT_FILE = "REPORT.md"
FIGURES = "figures"
SAMPLES_PER_CLASS = 8
# The comparison figure: images per half-row (fewer past 20 classes, so that
# CIFAR-100's 100 rows stay a figure one can open) and the smallest tile side.
COMPARISON_PER_CLASS = 8
COMPARISON_PER_CLASS_MANY = 4
COMPARISON_MIN_TILE = 96
STAGE_TITLES = {"after_class_encoder": "after the class encoder (stage 1)",
                "after_unet_finetune": "after UNet fine-tuning (stage 3)"}


def majority_floor(y_test, label_names):
    """(accuracy, label name, count, n) of always predicting the most frequent test class."""
    counts = np.bincount(np.asarray(y_test), minlength=len(label_names))
    top = int(np.argmax(counts))
    return float(counts[top] / counts.sum()), label_names[top], int(counts[top]), int(counts.sum())


def _pct(value):
    return "–" if value is None else f"{100 * value:.1f} %"


def _copy_figure(source, figures_dir, name):
    """Copies a PNG into the report's figures/ folder; returns its path relative to the report."""
    source = Path(source)
    if not source.is_file():
        return None
    target = figures_dir / name
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return f"{FIGURES}/{name}"


def _multiple_keys(runs):
    """The "x<N>" keys of a CAS table, by N."""
    keys = [k for k in runs if k.startswith("x") and k[1:].isdigit()]
    return sorted(keys, key=lambda k: int(k[1:]))


def data_section(splits):
    """Which real data was used and how it was checked (Data/checksums.py)."""
    spec, v = splits.spec, splits.verification
    lines = ["## Real data", "",
             f"{spec.name}: {spec.num_classes} classes ({', '.join(spec.label_names)}), {spec.image_size}x"
             f"{spec.image_size}, {'grey' if spec.channels == 1 else 'RGB'}; train {len(splits.y_train)}, "
             f"val {len(splits.y_val)}, test {len(splits.y_test)}."]
    if splits.train_subset:
        t = splits.train_subset
        lines += ["", f"Training split: a stratified subset of {t['images']} of its {splits.full_train_size} images "
                      f"(`--train_subset {t['images']} --train_subset_seed {t['seed']}`); x1 means {t['images']} images."]
    if v is not None:
        lines += ["", f"Checked: **{v.status}** ({v.detail})."]
        if v.status == "unverified":
            lines += ["", "**Warning:** the data's content differs from the official release "
                          "(accepted with `--accept_unverified_data`): these numbers are not comparable "
                          "with results on the official data."]
    return lines + [""]


def cas_section(exp, dataset, splits, figures_dir):
    from Metrics.cas import load_cas, plot_cas, published_cas

    ours = load_cas(exp, dataset)
    paper = published_cas(dataset)
    floor, floor_name, floor_count, n_test = majority_floor(splits.y_test, splits.spec.label_names)
    lines = ["## Classification accuracy score (CAS)", "",
             f"ResNet20 trained on each training set, validated and tested on the REAL "
             f"{dataset} splits (test: {n_test} images). Ours from `{cas_results_json(exp)}`"
             + (f"; the paper's from `{PUBLISHED_CAS_JSON.name}`." if paper else
                "; the paper did not report this dataset."), ""]
    keys = ["real"] + sorted(set(_multiple_keys(ours)) | set(_multiple_keys(paper) if paper else []),
                             key=lambda k: int(k[1:]))
    header = "| training set | ours top-1 | ours top-5 | n train | epochs |"
    rule = "| --- | --- | --- | --- | --- |"
    if paper:
        header += " paper top-1 | paper top-5 |"
        rule += " --- | --- |"
    lines += [header, rule]
    for key in keys:
        mine = ours.get(key) or {}
        if not mine and key not in (paper or {}):
            continue
        row = (f"| {key} | {_pct(mine.get('top1'))} | {_pct(mine.get('top5'))} | "
               f"{mine.get('n_train', '–')} | {mine.get('epochs_run', '–')} |")
        if paper:
            theirs = paper.get(key) or {}
            row += f" {_pct(theirs.get('top1'))} | {_pct(theirs.get('top5'))} |"
        lines.append(row)
    lines += ["", f"Majority-class floor: always answering \"{floor_name}\" scores **{_pct(floor)}** "
                  f"top-1 on the real test split ({floor_count} of {n_test}).", ""]
    if ours:
        plot = plot_cas(exp, dataset, floor=floor)
        relative = _copy_figure(plot, figures_dir, "cas_curve.png")
        if relative:
            lines += [f"![CAS curve: ours against the paper's]({relative})", ""]
    else:
        lines += ["No CAS result recorded yet.", ""]
    return lines


def unet_tuning_lines(exp, dataset):
    """How the UNet was fine-tuned (the dif stage's settings.json): every weight, or LoRA adapters."""
    from Utils.paths import diffusion_checkpoint_dir

    settings = read_json(diffusion_checkpoint_dir(exp, dataset, "dif") / "settings.json", default=None) or {}
    if settings.get("unet_tuning") != "lora":
        return []
    return [f"**UNet fine-tuning:** LoRA adapters (rank {settings['lora_rank']}, alpha {settings['lora_alpha']:g}) "
            "on the attention projections, the base UNet frozen (`--unet_tuning lora`, "
            "Models/diffusion/lora.py), merged into the UNet for generation; the paper fine-tunes every "
            "weight.", ""]


def pipeline_section(exp, dataset):
    table = (read_json(pipeline_results_json(exp), default={}) or {}).get(dataset, {})
    published = read_json(PUBLISHED_CAS_JSON, default={}) if PUBLISHED_CAS_JSON.exists() else {}
    paper = (published or {}).get("pipeline", {}).get(dataset, {})
    lines = ["## The stage table (top-1 / top-5 on the real test split)", "",
             "Generated images from each stage's checkpoints, default settings (`no_opt`: the preset's "
             "steps and guidance scale, last checkpoint) and tuned ones (`opt`: the study's winner, "
             "chosen on VALIDATION accuracy; `opt_kid`: the KID study's winner), one ResNet20 each. "
             f"From `{pipeline_results_json(exp)}`.", ""]
    if not table:
        return lines + ["Nothing recorded yet.", ""]
    columns = ["no_opt", "opt"] + (["opt_kid"] if any("opt_kid" in v for v in table.values()) else [])
    header = "| stage | " + " | ".join(f"ours {c}" for c in columns) + " |"
    rule = "| --- |" + " --- |" * len(columns)
    if paper:
        header += " paper no_opt | paper opt |"
        rule += " --- | --- |"
    lines += [header, rule]
    for stage_key, title in STAGE_TITLES.items():
        cells = table.get(stage_key, {})
        row = f"| {title} | " + " | ".join(
            f"{_pct(cells[c].get('top1'))} / {_pct(cells[c].get('top5'))}" if c in cells else "–"
            for c in columns) + " |"
        if paper:
            theirs = paper.get(stage_key, {})
            row += " " + " | ".join(
                f"{_pct(theirs[c]['top1'])} / {_pct(theirs[c]['top5'])}" if c in theirs else "–"
                for c in ("no_opt", "opt")) + " |"
        lines.append(row)
    lines += ["", "| stage | row | settings | validation top-1 | images | classifier epochs |",
              "| --- | --- | --- | --- | --- | --- |"]
    for stage_key, title in STAGE_TITLES.items():
        cells = table.get(stage_key, {})
        for column in sorted(cells, key=lambda c: ("no_opt", "opt", "opt_kid").index(c)
                             if c in ("no_opt", "opt", "opt_kid") else 9):
            cell = cells[column]
            settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in (cell.get("settings") or {}).items())
            lines.append(f"| {title} | {column} | {settings} | {_pct(cell.get('val_accuracy'))} | "
                         f"{cell.get('num_imgs', '–')} | {cell.get('classifier_epochs', '–')} |")
    return lines + [""]


def tuning_section(exp, dataset, storage_url, figures_dir):
    from Pipeline import tuning
    from Utils.paths import optimization_plots_dir

    lines = ["## Tuning (Optuna: TPE sampler, Hyperband pruner)", "",
             "Objective: best validation accuracy of a ResNet20 trained on the trial's images; "
             "the test accuracy is stored per trial and never optimised.", ""]
    storage = None
    if storage_url:
        try:
            storage = tuning.open_storage(storage_url)
        except Exception as e:  # the report must not fail over a missing study
            lines += [f"Storage {tuning.redact(storage_url)} could not be opened: {e}", ""]
    for stage, title in (("enc", "Study #1: class-encoder checkpoints"), ("dif", "Study #2: fine-tuned UNet")):
        name = tuning.tuning_study_name(dataset, exp, stage)
        lines += [f"### {title} (`{name}`)", ""]
        study = None
        if storage is not None:
            import optuna

            try:
                study = optuna.load_study(study_name=name, storage=storage)
            except KeyError:
                study = None
        if study is None:
            lines += ["Not run.", ""]
            continue
        counts = tuning.count_trials(study)
        lines.append("Trials: " + ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items())) + ".")
        protocol = study.user_attrs.get("protocol", {})
        if protocol:
            lines.append(f"Per trial: {protocol.get('num_imgs')} generated images, ResNet20 for at most "
                         f"{protocol.get('classifier_epochs')} epochs (batch {protocol.get('classifier_batch_size')}), "
                         f"seed {protocol.get('seed')}.")
        if tuning.completed_trials(study):
            best = tuning.best_trial(study)
            params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
            lines.append(f"Winner: trial {best.number}, {params}: validation top-1 {_pct(best.value)}, "
                         f"test top-1 {_pct(best.user_attrs.get('test_top1'))} (recorded only).")
            if study.best_trial.number != best.number:
                lines.append(f"Trial {study.best_trial.number} scored {_pct(study.best_trial.value)} on validation, "
                             "within one standard error of the default settings, which therefore stay the winner "
                             "(the one-standard-error rule, `Pipeline/tuning/results.py: best_trial`).")
        lines += ["", "| trial | state | settings | validation top-1 | test top-1 (recorded) | epochs |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for trial in study.get_trials(deepcopy=False):
            params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
            epochs = max(trial.intermediate_values) if trial.intermediate_values else "–"
            lines.append(f"| {trial.number} | {trial.state.name.lower()} | {params} | "
                         f"{_pct(trial.value) if trial.value is not None else '–'} | "
                         f"{_pct(trial.user_attrs.get('test_top1'))} | {epochs} |")
        lines.append("")
        plots = optimization_plots_dir(exp, dataset, stage)
        for plot, caption in (("history", "optimisation history"), ("contour_steps_ugs", "steps x UGS"),
                              ("intermediate_values", "validation accuracy per epoch (what the pruner saw)")):
            relative = _copy_figure(plots / f"{plot}.png", figures_dir, f"{stage}_{plot}.png")
            if relative:
                lines.append(f"![{title}: {caption}]({relative})")
        if plots.is_dir():
            lines += ["", f"All plots: `{plots}`."]
        lines.append("")
    return lines


def methods_section(dataset, figures_dir=None):
    """The CAS of every conditioning method recorded for `dataset`, one row per experiment
    (each method runs in its own --exp: its checkpoints and data sets are its own), and with
    `figures_dir` their CAS curves in one figure (figures/methods_cas.png)."""
    import json

    from Utils.paths import results_dir

    rows, curves = [], {}
    for path in sorted(results_dir().glob("test_accuracies_exp*.json")):
        try:
            entry = json.loads(path.read_text()).get(dataset) or {}
        except (OSError, ValueError):
            continue
        exp = path.stem[len("test_accuracies_exp"):]
        multiples = sorted(_multiple_keys(entry), key=lambda k: int(k[1:]))
        methods = {entry[k].get("conditioning") for k in multiples if isinstance(entry.get(k), dict)} - {None}
        if not multiples or not methods:
            continue
        cells = " ".join(f"{k} {_pct(entry[k].get('top1'))}" for k in multiples)
        rows.append(f"| {', '.join(sorted(methods))} | {exp} | {_pct((entry.get('real') or {}).get('top1'))} "
                    f"| {cells} |")
        curves[f"{', '.join(sorted(methods))} (exp {exp})"] = [
            (int(k[1:]), entry[k]["top1"]) for k in multiples if entry[k].get("top1") is not None]
    if len({row.split('|')[1] for row in rows}) < 2:
        return []  # one method: the CAS table above says it all
    lines = ["## Conditioning methods compared", "",
             f"CAS top-1 on the real {dataset} test split, per conditioning method (`--conditioning`) and experiment.",
             "", "| conditioning | exp | real | synthetic |", "| --- | --- | --- | --- |", *rows, ""]
    if figures_dir is not None:
        name = "methods_cas.png"
        _methods_figure(curves, dataset, Path(figures_dir) / name)
        lines += [f"![CAS of each conditioning method]({FIGURES}/{name})", ""]
    return lines


def _methods_figure(curves, dataset, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        if points:
            ax.plot(*zip(*[(n, 100 * top1) for n, top1 in points]), marker="o", label=label)
    ax.set_xlabel("synthetic training set (x the real training split)")
    ax.set_ylabel("CAS top-1 (%)")
    ax.set_title(f"{dataset}: conditioning methods")
    ax.legend(fontsize=8)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)


def generation_section(manifest):
    lines = ["## The generated dataset", ""]
    if not manifest:
        return lines + ["Not generated yet.", ""]
    settings = {**manifest.get("settings", {}), "resize_method": manifest.get("resize_method"),
                "complete": manifest.get("complete")}
    settings.setdefault("conditioning", "class_encoder")
    shown = {k: settings[k] for k in ("conditioning", "img_total", "enc_epoch", "dif_epoch", "inf_steps", "ugs",
                                      "sampler", "timestep_spacing", "eta",
                                      "seed", "preset", "generation_size", "native_size", "resize_method",
                                      "complete")
             if settings.get(k) is not None}
    lines += ["The settings of tuning #2's winner (class encoder of tuning #1's winner):", "",
              "| setting | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in shown.items()]
    return lines + [""]


def samples_section(dataset, splits, exp, figures_dir):
    from Data.images import save_image_grid
    from Data.synthetic import load_image_folder

    lines = ["## Samples per class: real (test split) and generated", ""]
    names = splits.spec.label_names
    real = figures_dir / "samples_real.png"
    save_image_grid(splits.x_test, splits.y_test, names, real, per_class=SAMPLES_PER_CLASS,
                    title=f"{dataset}: real test images")
    lines.append(f"![real samples]({FIGURES}/{real.name})")
    folder = synthetic_dir(exp, dataset)
    try:
        x, y, _ = load_image_folder(folder, splits.spec)
    except Exception as e:  # no generated set yet: say so, keep the rest of the report
        lines += ["", f"No generated images to show ({str(e).splitlines()[0]})."]
        return lines + [""]
    generated = figures_dir / "samples_generated.png"
    save_image_grid(x, y, names, generated, per_class=SAMPLES_PER_CLASS,
                    title=f"{dataset}: generated images (first of each class)")
    lines.append(f"![generated samples]({FIGURES}/{generated.name})")
    lines += [""] + comparison_lines(dataset, splits, x, y, figures_dir)
    if splits.spec.channels == 1:
        lines += speckle_lines(dataset, splits.x_test, x)
    return lines + [""]


def comparison_lines(dataset, splits, x_generated, y_generated, figures_dir):
    """Writes figures/real_vs_generated.png; returns the report lines that show it."""
    from Data.images import save_comparison_grid

    names = splits.spec.label_names
    per_class = COMPARISON_PER_CLASS if len(names) <= 20 else COMPARISON_PER_CLASS_MANY
    side = min(splits.x_test.shape[1:3])
    scale = max(1, -(-COMPARISON_MIN_TILE // side))
    path = figures_dir / "real_vs_generated.png"
    save_comparison_grid(splits.x_test, splits.y_test, x_generated, y_generated, names, path,
                         per_class=per_class, min_tile=COMPARISON_MIN_TILE,
                         title=f"{dataset}: real test images (left) vs generated images (right)")
    return [f"Real against generated, class by class: each row holds the first {per_class} real test "
            f"images of the class, then (right of the line) the first {per_class} generated ones, both "
            f"at the native {side} px, upscaled {scale}x with nearest neighbour to {side * scale} px "
            "tiles so that single pixels can be judged by eye.", "",
            f"![real vs generated, per class]({FIGURES}/{path.name})", ""]


def speckle_lines(dataset, x_real, x_generated):
    """The colour-speckle table of a grey dataset: generated images against the real test images."""
    from Metrics.speckle import DEFAULT_THRESHOLD, speckle_share

    def share(images):
        value = speckle_share(images, DEFAULT_THRESHOLD)
        return "< 0.01 %" if 0 < value < 5e-5 else f"{100 * value:.2f} %"

    return ["### Colour speckle", "",
            f"{dataset} is a grey dataset: every real image has R = G = B, so coloured specks in the "
            "generated images are pixels whose channels disagree; "
            f"counted by `Metrics/speckle.py` (max minus min over R, G, B > {DEFAULT_THRESHOLD} "
            "uint8 levels) at the native size the classifier trains on.", "",
            f"| images | n | share of pixels whose channels disagree by more than {DEFAULT_THRESHOLD}/255 |",
            "| --- | --- | --- |",
            f"| real (test split) | {len(x_real)} | {share(x_real)} |",
            f"| generated | {len(x_generated)} | {share(x_generated)} |", ""]


def quality_section(exp, dataset):
    results = (read_json(quality_results_json(exp), default={}) or {}).get(dataset)
    lines = ["## Quality metrics", ""]
    if not results:
        return lines + [f"Not computed (`reproduce.py --quality`, or `python evaluate_dataset.py --dataset {dataset} "
                        f"--synthetic_dir '{synthetic_dir(exp, dataset)}' --exp {exp} --features resnet20`).", ""]
    columns = ("fid", "kid_mean", "mmd2_gaussian", "precision", "recall", "density", "coverage")
    lines += [f"From `{quality_results_json(exp)}` (synthetic set against the real "
              "reference split, `Metrics/quality.py`).", "",
              "| folder | features | n synthetic | " + " | ".join(columns) + " | suspected copies |",
              "| --- | --- | --- |" + " --- |" * len(columns) + " --- |"]
    for folder, by_features in results.items():
        for features, result in (by_features or {}).items():
            if not isinstance(result, dict) or "overall" not in result:
                continue
            overall, memo = result["overall"], result.get("memorization", {})
            cells = " | ".join("–" if overall.get(c) is None else f"{overall[c]:.4g}" for c in columns)
            share = memo.get("suspected_share")
            lines.append(f"| `{folder}` | {features} | {overall.get('n_synthetic', '–')} | {cells} | "
                         f"{'–' if share is None else f'{100 * share:.1f} %'} |")
    return lines + [""]


def rating_section(exp, dataset):
    """Human judgement: each study of rate_dataset.py under the experiment's ratings/ with answers ([] if none)."""
    from Pipeline.rating import DEFAULT_MAX_FAILED_CHECKS, REPORT_JSON, study_dirs, study_summary, summary_lines

    summaries = []
    for folder in study_dirs(experiment_dir(exp, dataset) / "ratings"):
        # The exclusion rule of the study's own last --report, else the default.
        last = read_json(folder / REPORT_JSON, default={}) or {}
        summary = study_summary(folder, last.get("max_failed_checks", DEFAULT_MAX_FAILED_CHECKS))
        if summary["raters"]:
            summaries.append(summary)
    if not summaries:
        return []
    lines = ["## Human judgement", "",
             "`rate_dataset.py`: people shown a real and a generated image of one class pick the real one "
             "(`Pipeline/rating.py`; the figures and the exclusion rule: `Metrics/rating_stats.py`).", ""]
    for summary in summaries:
        lines += summary_lines(summary, heading="###")
    return lines


def commands_section(command, stage_log):
    lines = ["## How this was made", "", "The whole pipeline:", "", "```", command, "```", "",
             "Each stage ran the equivalent of (in order; a stage whose outputs existed was skipped):", "",
             "| stage | status | seconds | finished |", "| --- | --- | --- | --- |"]
    for name, entry in stage_log.items():
        lines.append(f"| {name} | {entry.get('status', '?')} | {entry.get('seconds', '–')} | "
                     f"{entry.get('finished', '–')} |")
    lines += ["", "```"]
    lines += [entry["command"] for entry in stage_log.values() if entry.get("command")]
    lines += ["```", "", "| software | version |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in software_versions().items()]
    return lines + [""]


def write_report(exp, dataset, preset, budget, stage_log, command, storage_url=None, data_dir=None,
                 manifest=None, wall_seconds=None, splits=None):
    """Writes REPORT.md (and figures/) into the experiment folder; returns the report's path.

    `splits`: the real data already loaded (else read from `data_dir`)."""
    from Data.loaders import load_dataset

    out_dir = experiment_dir(exp, dataset)
    figures_dir = out_dir / FIGURES
    figures_dir.mkdir(parents=True, exist_ok=True)
    splits = splits if splits is not None else load_dataset(dataset, data_dir=data_dir)
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [f"# Reproduction report: {dataset}, preset `{preset}`, Exp {exp}", "",
             f"Written {now} by `reproduce.py` with the `{budget}` budget"
             + (f"; the stages run by this invocation took {wall_seconds:.0f} s." if wall_seconds else "."), ""]
    if preset != "sd1":
        lines += [f"**Note:** the generator here is the `{preset}` preset, not the paper's pretrained "
                  "Stable Diffusion v1 (see Models/diffusion/presets.py): the paper's figures are shown "
                  "for reference, not as a target these numbers should meet.", ""]
    if budget != "paper":
        lines += [f"**Note:** the `{budget}` budget uses far fewer trials, images and epochs than the "
                  "paper (see Pipeline/stages.py, BUDGETS); `--budget paper` runs the paper's sizes.", ""]
    lines += unet_tuning_lines(exp, dataset)
    lines += data_section(splits)
    lines += cas_section(exp, dataset, splits, figures_dir)
    lines += methods_section(dataset, figures_dir)
    lines += pipeline_section(exp, dataset)
    lines += tuning_section(exp, dataset, storage_url, figures_dir)
    lines += generation_section(manifest)
    lines += samples_section(dataset, splits, exp, figures_dir)
    lines += quality_section(exp, dataset)
    lines += rating_section(exp, dataset)
    lines += commands_section(command, stage_log)
    path = out_dir / REPORT_FILE
    atomic_write_text(path, "\n".join(lines))
    return path
