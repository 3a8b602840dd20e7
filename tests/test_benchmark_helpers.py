"""The benchmark scripts' argument handling and set selection (the scripts themselves run by hand)."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_classifier import main as bench_classifier_main
from benchmarks.bench_first_step import grappler_options
from benchmarks.bench_recipe import main as bench_recipe_main
from benchmarks.bench_recipe import ScoreLog, label_probability, mean_and_runs, most_typical, multiple_indices
from benchmarks.bench_samplers import main as bench_samplers_main
from benchmarks.bench_samplers import quality_cells, row_identity, scored_rows
from benchmarks.bench_saved_set import load_saved_set
from benchmarks.bench_saved_set import main as bench_saved_set_main

BENCHMARK_SCRIPTS = Path(__file__).resolve().parent.parent / "benchmarks"


def _quality_args(**values):
    defaults = {"cells": None, "steps": "5,10", "samplers": ["ddim", "euler"]}
    return argparse.Namespace(**{**defaults, **values})


def test_quality_cells_are_every_sampler_at_every_step_count_unless_cells_are_named():
    assert quality_cells(_quality_args()) == [("ddim", 5), ("euler", 5), ("ddim", 10), ("euler", 10)]
    named = quality_cells(_quality_args(cells="ddim:50,dpmsolver++_karras:15"))
    assert named == [("ddim", 50), ("dpmsolver++_karras", 15)]


@pytest.mark.parametrize("cells", ["ddim", "ddim:x", "ddim:0", "heun:10", "ddim:10,"])
def test_a_bad_cell_stops_with_one_line_before_any_training(cells, capsys):
    with pytest.raises(SystemExit) as stopped:
        bench_samplers_main(["quality", "--cells", cells])
    assert "--cells wants SAMPLER:STEPS" in str(stopped.value)


@pytest.mark.parametrize("args", [["--repeats", "0"], ["--classifier_epochs", "-1"]])
def test_the_noise_part_refuses_empty_runs_with_one_line(args):
    with pytest.raises(SystemExit) as stopped:
        bench_classifier_main(["noise", *args])
    assert str(stopped.value) == "error: --repeats and --classifier_epochs must be at least 1"


@pytest.mark.parametrize("main, args", [(bench_recipe_main, ["--tag", "t"]), (bench_samplers_main, ["quality"])])
def test_classifier_runs_must_be_at_least_one(main, args):
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--classifier_runs", "0"])
    assert str(stopped.value) == "error: --classifier_runs must be at least 1, not 0"


def test_a_set_scored_by_several_classifiers_keeps_the_mean_and_each_run():
    assert mean_and_runs([0.5], "x1") == {"x1": 0.5}
    assert mean_and_runs([0.5, 0.75, 0.25], "x1") == {"x1": 0.5, "x1_runs": [0.5, 0.75, 0.25]}


def test_resume_skips_the_rows_the_output_holds_with_the_same_settings(tmp_path, capsys):
    import json

    out = tmp_path / "rows.jsonl"
    assert scored_rows(out) == set()
    scoring = {"dataset": "digits", "classifier_epochs": 8, "seed": 0}
    floor = {"sampler": "real training split", **scoring, "cas_x1_top1": 0.98, "kid": 0.1}
    # Written before rows recorded classifier_runs: one run, or as many as their top-1 list.
    cell = {"sampler": "ddim", "steps": 5, "guidance": 1.5, "preset": "small", "epochs": 50, **scoring,
            "cas_x1_top1": 0.9, "kid": 1.0}
    three = {**cell, "steps": 10, "cas_x1_top1_runs": [0.9, 0.8, 0.85]}
    out.write_text("".join(json.dumps(row) + "\n" for row in (floor, cell, three)))
    done = scored_rows(out)
    assert row_identity({**cell, "classifier_runs": 1, "cas_x1_top1": 0.5}) in done
    assert row_identity({**three, "classifier_runs": 3}) in done
    for other in ({"seed": 1}, {"steps": 15}, {"timestep_spacing": "trailing"}, {"classifier_runs": 3},
                  {"epochs": 40}, {"guidance": 2.5}):
        assert row_identity({**cell, **other}) not in done, other

    # Everything asked for is there: nothing is loaded, trained or written.
    before = out.read_text()
    bench_samplers_main(["quality", "--cells", "ddim:5", "--guidance", "1.5", "--epochs", "50", "--resume",
                         "--out", str(out)])
    assert out.read_text() == before
    assert "to score: 0 cells" in capsys.readouterr().out

    # Without the floor in the file, --no_floor still leaves nothing to do.
    out.write_text("".join(json.dumps(row) + "\n" for row in (cell, three)))
    bench_samplers_main(["quality", "--cells", "ddim:5", "--guidance", "1.5", "--epochs", "50", "--resume",
                         "--no_floor", "--out", str(out)])
    assert out.read_text() == "".join(json.dumps(row) + "\n" for row in (cell, three))
    assert "to score: 0 cells" in capsys.readouterr().out


def test_a_samplers_row_cut_short_takes_the_scores_it_had_instead_of_training_again(tmp_path):
    import json

    out = tmp_path / "rows.jsonl"
    floor = {"sampler": "real training split", "dataset": "digits", "classifier_epochs": 8,
             "classifier_runs": 2, "seed": 0}
    # Killed after the floor's scores were made, before its row: values no classifier would give,
    # so a row that holds them took them from the log.
    kept = [("top1_seed0", 0.125), ("top1_seed1", 0.375), ("kid_fid", [7.0, 9.0])]
    out.with_suffix(".scores.jsonl").write_text("".join(
        json.dumps({"settings": floor, "set": "x1", "score": score, "value": value}) + "\n"
        for score, value in kept))
    bench_samplers_main(["quality", "--floor_only", "--classifier_runs", "2", "--resume", "--out", str(out)])
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row == {**floor, "cas_x1_top1": 0.25, "cas_x1_top1_runs": [0.125, 0.375], "kid": 7.0, "fid": 9.0}


def test_floor_only_and_no_floor_together_stop_with_one_line():
    with pytest.raises(SystemExit) as stopped:
        bench_samplers_main(["quality", "--floor_only", "--no_floor"])
    assert str(stopped.value) == "error: --floor_only and --no_floor leave nothing to score"


@pytest.mark.parametrize("args", [["--repeats", "1"], ["--images", "0"], ["--cells", "ddim"]])
def test_repeat_refuses_bad_arguments_with_one_line(args, tmp_path):
    weights = tmp_path / "m.weights.h5"
    weights.write_bytes(b"")
    with pytest.raises(SystemExit) as stopped:
        bench_samplers_main(["repeat", "--weights", str(weights), *args])
    assert str(stopped.value).startswith("error: --")


def test_weights_must_be_a_keras_weights_file():
    with pytest.raises(SystemExit) as stopped:
        bench_samplers_main(["quality", "--weights", "model.h5"])
    assert ".weights.h5" in str(stopped.value)


def test_multiple_indices_take_the_first_k_x1_counts_of_each_class():
    labels = np.array([0, 1, 0, 1, 0, 1, 2, 2, 2, 2])
    per_class_x1 = np.array([1, 1, 2])
    assert sorted(multiple_indices(labels, per_class_x1, 1)) == [0, 1, 6, 7]
    assert sorted(multiple_indices(labels, per_class_x1, 2)) == [0, 1, 2, 3, 6, 7, 8, 9]


def test_of_each_class_the_most_probable_of_its_first_pool_times_count_candidates_are_kept_most_typical_first():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 2, 2, 2, 2])
    probability = np.array([.1, .9, .7, .2, .3, .8, .95, .5, .4, .6, .6, .1])
    # class 0: candidates 0, 2 (pool 2 x 1); class 1: 1, 3, 5, 7 (pool 2 x 2); class 2: 8, 9 (pool 2 x 1)
    kept = most_typical(labels, probability, per_class=[1, 2, 1], pool=2)
    assert kept.tolist() == [2, 1, 5, 9]
    # Candidate 6 (p .95) is past class 0's first two: a larger pool reaches it.
    assert most_typical(labels, probability, per_class=[1, 1, 1], pool=4).tolist() == [6, 1, 9]
    # Equal probabilities (class 2's 9 and 10): the earlier image first.
    assert most_typical(labels, probability, per_class=[0, 0, 2], pool=2).tolist() == [9, 10]


def test_a_pool_of_one_keeps_the_set_without_selection():
    labels = np.repeat(np.arange(3), 4)
    probability = np.random.default_rng(0).random(len(labels))
    kept = most_typical(labels, probability, per_class=[4, 3, 2], pool=1)
    assert sorted(kept.tolist()) == [0, 1, 2, 3, 4, 5, 6, 8, 9]


@pytest.mark.parametrize("per_class, pool, probability, message", [
    ([3, 1], 2, None, "class 0: 4 candidates, 6 needed"),
    ([1, 1], 0, None, "at least 1"),
    ([1, 1], 1.5, None, "whole number"),
    ([1, 1], 2, np.array([.5, np.nan, .5, .5, .5, .5, .5, .5]), "NaN or infinity"),
    ([1, 1], 2, np.array([.5, .5]), "one probability per image"),
])
def test_what_cannot_be_selected_is_refused(per_class, pool, probability, message):
    labels = np.repeat([0, 1], 4)
    probability = np.full(len(labels), 0.5) if probability is None else probability
    with pytest.raises(ValueError, match=message):
        most_typical(labels, probability, per_class, pool)


def test_label_probability_is_the_classifiers_softmax_at_each_images_own_label():
    import keras

    images = np.random.default_rng(1).integers(0, 256, (7, 2, 2, 1)).astype("float32")
    labels = np.array([0, 1, 2, 0, 1, 2, 2])
    classifier = keras.Sequential([keras.Input((2, 2, 1)), keras.layers.Flatten(),
                                   keras.layers.Dense(3, activation="softmax")])
    weights = np.random.default_rng(2).normal(0, 0.01, (4, 3)).astype("float32")
    classifier.layers[-1].set_weights([weights, np.array([0.1, -0.2, 0.3], "float32")])
    logits = images.reshape(7, 4) @ weights + np.array([0.1, -0.2, 0.3])
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    np.testing.assert_allclose(label_probability(classifier, images, labels, batch_size=3),
                               softmax[np.arange(7), labels], rtol=1e-5)
    with pytest.raises(ValueError, match="one label per image"):
        label_probability(classifier, images, labels[:3])


def test_a_saved_set_is_checked_before_use(tmp_path):
    good = tmp_path / "set.npz"
    images = np.zeros((4, 8, 8, 1), np.uint8)
    np.savez(good, images=images, labels=np.array([0, 1, 2, 1]))
    loaded_images, loaded_labels = load_saved_set(good, num_classes=3)
    assert loaded_images.shape == (4, 8, 8, 1) and list(loaded_labels) == [0, 1, 2, 1]

    cases = {"floats.npz": (images.astype("float32"), np.array([0, 1, 2, 1]), "uint8"),
             "label_range.npz": (images, np.array([0, 1, 3, 1]), "labels outside"),
             "count.npz": (images, np.array([0, 1, 2]), "N labels")}
    for name, (x, y, message) in cases.items():
        np.savez(tmp_path / name, images=x, labels=y)
        with pytest.raises(SystemExit) as stopped:
            load_saved_set(tmp_path / name, num_classes=3)
        assert message in str(stopped.value)
    (tmp_path / "junk.npz").write_text("not an npz")
    with pytest.raises(SystemExit, match="not a saved set"):
        load_saved_set(tmp_path / "junk.npz", num_classes=3)


@pytest.mark.parametrize("multiples", ["x", "0", "1,,2"])
def test_bad_multiples_stop_with_one_line(multiples, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        bench_saved_set_main([str(tmp_path / "set.npz"), "--dataset", "digits", "--multiples", multiples,
                              "--out", str(tmp_path / "rows.jsonl")])
    assert "--multiples" in str(stopped.value)
    assert not (tmp_path / "rows.jsonl").exists()


@pytest.mark.parametrize("pool", ["0", "-2", "1.5", "three"])
def test_a_bad_filter_pool_stops_with_one_line_before_anything_is_written(pool, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        bench_recipe_main(["--tag", "t", "--filter_pool", pool, "--out", str(tmp_path / "rows.jsonl")])
    assert stopped.value.code == 2
    assert "--filter_pool" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_killed_recipe_run_resumes_with_the_scores_it_had_and_makes_only_the_missing_ones(tmp_path, capsys):
    import json

    out, weights = tmp_path / "rows.jsonl", tmp_path / "m.weights.h5"
    scores = out.with_suffix(".scores.jsonl")
    # A 100-image subset of digits: every step of the script at a tenth of the whole split's cost.
    args = ["--tag", "t", "--preset", "tiny", "--epochs", "1", "--steps", "2", "--classifier_epochs", "1",
            "--classifier_runs", "2", "--with_real", "--train_subset", "100", "--weights", str(weights),
            "--out", str(out)]
    bench_recipe_main(args)
    (whole,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert whole["train_subset"] == {"images": 100, "seed": 0}
    lines = scores.read_text().splitlines()
    # x1: two classifiers and the distances; the real split: the same.
    assert [(json.loads(line)["set"], json.loads(line)["score"]) for line in lines] == [
        ("x1", "top1_seed0"), ("x1", "top1_seed1"), ("x1", "kid_fid"),
        ("real", "top1_seed0"), ("real", "top1_seed1"), ("real", "kid_fid")]
    assert all(json.loads(line)["settings"]["train_subset"] == whole["train_subset"] for line in lines)

    # Killed while writing the last score, before the row: five scores kept, one line cut short.
    scores.write_text("\n".join(lines[:5]) + "\n" + lines[5][:25])
    out.unlink()
    bench_recipe_main([*args, "--resume"])
    (resumed,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert "read from" in capsys.readouterr().out  # the model was read, not trained again
    for key in ("cas_x1_top1", "cas_runs", "kid", "fid", "real_top1", "real_top1_runs", "real_train_kid",
                "real_train_fid", "speckle"):
        assert resumed[key] == whole[key], key
    # The cut line is skipped; the missing score is made again (the same value) and appended whole.
    again = scores.read_text().splitlines()
    assert again[:5] == lines[:5] and again[5] == lines[5][:25]
    assert [json.loads(line) for line in again[6:]] == [json.loads(lines[5])]

    # Killed while writing the row: every score is kept, so none is made; the cut line is not taken
    # for the row, which is written whole on a line of its own.
    row_line = out.read_text().splitlines()[0]
    out.write_text(row_line[:40])
    before_scores = scores.read_text()
    bench_recipe_main([*args, "--resume"])
    assert scores.read_text() == before_scores
    cut, rewritten = out.read_text().splitlines()
    assert cut == row_line[:40]
    assert {**json.loads(rewritten), "generate_s": None} == {**json.loads(row_line), "generate_s": None}

    # Resumed once more with everything there: no classifier trained, no row written twice, and
    # neither the model read nor an image generated.
    before_rows, grid = out.read_text(), tmp_path / "rows_t.png"
    grid_written = grid.stat().st_mtime_ns
    capsys.readouterr()
    bench_recipe_main([*args, "--resume"])
    assert scores.read_text() == before_scores and out.read_text() == before_rows
    said = capsys.readouterr()
    assert "t: its rows are in" in said.out and "read from" not in said.out and "generating" not in said.err
    assert grid.stat().st_mtime_ns == grid_written


def test_a_filtered_recipe_run_generates_the_pool_and_keeps_what_its_filter_finds_most_typical(tmp_path):
    import json

    from benchmarks.bench_recipe import FILTER_SEED, filter_scorer
    from Data.loaders import load_dataset
    from Data.registry import get_spec

    out, saved = tmp_path / "rows.jsonl", tmp_path / "set.npz"
    bench_recipe_main(["--tag", "f", "--preset", "tiny", "--epochs", "1", "--steps", "2", "--classifier_epochs", "1",
                       "--train_subset", "100", "--filter_pool", "2", "--save_images", str(saved), "--out", str(out)])
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["filter_pool"] == 2 and row["filter_seed"] == FILTER_SEED
    scores = [json.loads(line) for line in out.with_suffix(".scores.jsonl").read_text().splitlines()]
    assert scores and all(score["settings"]["filter_pool"] == 2 for score in scores)

    # Two candidates for each of x1's 100 images, each with its probability under the filter: a ResNet20 of the
    # scorer's protocol trained with the filter's seed on the same real subset gives the same probabilities.
    with np.load(saved) as candidates:
        images, labels, probability = candidates["images"], candidates["labels"], candidates["filter_probability"]
    assert np.bincount(labels).tolist() == [20] * 10
    splits = load_dataset("digits", train_subset=100)
    again = filter_scorer(get_spec("digits"), splits, 1, 64, FILTER_SEED)(images, labels)
    np.testing.assert_array_equal(again, probability)
    # The kept x1 is half the candidates, the more typical of each class: the grid shows its first eight.
    kept = most_typical(labels, probability, [10] * 10, pool=2)
    assert len(kept) == 100 and probability[kept].mean() > probability.mean()
    assert (tmp_path / "rows_f.png").exists()


def test_a_samplers_row_cut_short_by_a_kill_is_written_again_whole_from_the_kept_scores(tmp_path):
    import json

    out = tmp_path / "rows.jsonl"
    floor = {"sampler": "real training split", "dataset": "digits", "train_subset": {"images": 50, "seed": 0},
             "classifier_epochs": 8, "classifier_runs": 1, "seed": 0}
    kept = [("top1_seed0", 0.125), ("kid_fid", [7.0, 9.0])]
    out.with_suffix(".scores.jsonl").write_text("".join(
        json.dumps({"settings": floor, "set": "x1", "score": score, "value": value}) + "\n"
        for score, value in kept))
    whole_row = json.dumps({**floor, "cas_x1_top1": 0.125, "kid": 7.0, "fid": 9.0})
    out.write_text(whole_row[:30])  # killed while writing the floor's row
    assert scored_rows(out) == set()
    bench_samplers_main(["quality", "--floor_only", "--train_subset", "50", "--resume", "--out", str(out)])
    cut, row = out.read_text().splitlines()
    assert cut == whole_row[:30] and json.loads(row) == json.loads(whole_row)
    assert scored_rows(out) == {row_identity(floor)}
    # Another subset, or none, is another measurement.
    assert row_identity({**floor, "train_subset": None}) not in scored_rows(out)


def test_json_lines_are_appended_whole_and_read_back_without_the_lines_a_kill_cut(tmp_path):
    from Utils.io import append_json_line, read_json_lines

    path = tmp_path / "log" / "rows.jsonl"
    assert read_json_lines(path) == []
    append_json_line(path, {"a": 1})
    append_json_line(path, {"b": np.float32(0.5), "c": (1, 2)})
    assert path.read_text() == '{"a": 1}\n{"b": 0.5, "c": [1, 2]}\n'
    with open(path, "a") as f:
        f.write('{"d": ')  # a kill in the middle of a line
    append_json_line(path, {"e": 3})
    assert path.read_text().splitlines()[2:] == ['{"d": ', '{"e": 3}']
    with open(path, "a") as f:
        f.write("\n\n")
    assert read_json_lines(path) == [{"a": 1}, {"b": 0.5, "c": [1, 2]}, {"e": 3}]


def test_the_score_log_takes_a_score_only_for_the_same_settings_set_and_score(tmp_path):
    path = tmp_path / "scores.jsonl"
    made = []

    def make(value):
        return lambda: made.append(value) or value

    log = ScoreLog(path, resume=False)
    assert log.record({"guidance": 1.5, "channels": (32, 64)}, "x1", "top1_seed0", make(0.5)) == 0.5
    resumed = ScoreLog(path, resume=True)
    assert resumed.record({"channels": [32, 64], "guidance": 1.5}, "x1", "top1_seed0", make(0.9)) == 0.5
    assert resumed.record({"guidance": 2.5, "channels": (32, 64)}, "x1", "top1_seed0", make(0.6)) == 0.6
    assert resumed.record({"guidance": 1.5, "channels": (32, 64)}, "x2", "top1_seed0", make(0.7)) == 0.7
    assert resumed.record({"guidance": 1.5, "channels": (32, 64)}, "x1", "top1_seed1", make(0.8)) == 0.8
    assert made == [0.5, 0.6, 0.7, 0.8]
    # Without --resume the file is written but not read: a fresh run makes every score.
    assert ScoreLog(path, resume=False).record({"guidance": 2.5, "channels": (32, 64)}, "x1", "top1_seed0",
                                               make(0.1)) == 0.1
    assert len(path.read_text().splitlines()) == 5


@pytest.mark.parametrize("script, args", [("bench_recipe.py", ["--tag", "t", "--preset", "tiny"]),
                                          ("bench_samplers.py", ["quality", "--floor_only"])])
def test_a_training_subset_the_split_cannot_give_stops_with_one_line_and_writes_nothing(script, args, tmp_path):
    out = tmp_path / "rows.jsonl"
    done = subprocess.run([sys.executable, str(BENCHMARK_SCRIPTS / script), *args, "--train_subset", "5", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    last = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert last == ["error: --train_subset 5 for digits: a stratified subset of 1077 images in 10 classes needs "
                    "10 to 1077 images, not 5"]
    assert list(tmp_path.iterdir()) == []


def test_grappler_options_take_a_json_object_of_switches_and_reject_anything_else():
    assert grappler_options('{"constant_folding": false, "min_graph_nodes": -1}') == {
        "constant_folding": False, "min_graph_nodes": -1}
    assert grappler_options("{}") == {}
    for bad, message in (("x", "not JSON"), ("[1]", "JSON object"), ('{"constant_folding": 0.5}', "JSON object"),
                         ('{"constant_folding": null}', "JSON object")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            grappler_options(bad)


def test_a_graph_optimiser_option_tensorflow_does_not_know_stops_the_benchmark_before_it_measures():
    """TensorFlow ignores an unknown option name, so a typo would measure its default instead."""
    pytest.importorskip("tensorflow")
    done = subprocess.run([sys.executable, str(BENCHMARK_SCRIPTS / "bench_first_step.py"), "--grappler", '{"constant_foldin": false}'],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --grappler: TensorFlow has no graph optimiser option constant_foldin")
    assert "first fit" not in done.stdout
