"""The CAS protocol: training, resuming, evaluation, the results file and classifier_training.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from Data.images import RESIZE_METHOD
from Data.registry import get_spec
from Metrics.cas import cas_figure, load_cas, published_cas, record_cas, run_key_for
from Models.classifier import (ClassifierConfig, ClassifierPool, EpochShuffledBatches, evaluate_classifier,
                               load_classifier, train_classifier)
from Utils.paths import PUBLISHED_CAS_JSON

REPO = Path(__file__).resolve().parent.parent
# No XLA in the in-process tests: compiling costs more than these tiny runs (the script tests
# and the slow kill test run the default, XLA on TensorFlow).
TINY = dict(initial_filters=4, batch_size=32, jit_compile=False)


# ------------------------------------------------------------------ helpers ----

def _tiny_data(n=160, classes=3, size=8, seed=0):
    """Learnable toy images: each class has its own mean brightness per channel."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    means = rng.integers(40, 216, (classes, 3))
    x = np.clip(means[y][:, None, None, :] + rng.normal(0, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)
    return x[: n * 3 // 4], y[: n * 3 // 4], x[n * 3 // 4:], y[n * 3 // 4:]


def _identity_model(num_classes):
    """A real Keras model whose output is its input: evaluate_classifier on known probabilities."""
    return keras.Sequential([keras.Input((num_classes,)), keras.layers.Identity()])


def _one_error_line(result):
    # tqdm bars (cleared on a terminal, left as text in a pipe) are not messages.
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and "%|" not in line]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def _files_under(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ------------------------------------------------------------ the protocol ----

def test_config_defaults_are_the_papers_protocol():
    c = ClassifierConfig()
    assert (c.epochs, c.batch_size, c.initial_filters, c.label_smoothing) == (100, 256, 64, 0.1)
    assert (c.learning_rate, c.monitor, c.lr_factor, c.lr_patience, c.min_lr) == (1e-3, "val_accuracy", 0.1, 10, 1e-5)
    assert (c.early_stopping_patience, c.restore_best_weights) == (25, True)


def test_epoch_order_depends_only_on_seed_and_epoch():
    x = np.arange(10)[:, None, None, None].astype(np.uint8)
    a = EpochShuffledBatches(x, x, batch_size=4, seed=3, first_epoch=0)
    b = EpochShuffledBatches(x, x, batch_size=4, seed=3, first_epoch=2)
    a.on_epoch_begin()
    b.on_epoch_begin()
    served = [a[i][0].ravel().tolist() for _ in range(3) for i in range(len(a))]
    epoch2 = [b[i][0].ravel().tolist() for i in range(len(b))]
    assert len(a) == 3 and sorted(sum(served[:3], [])) == list(range(10))
    assert served[6:9] == epoch2            # a resumed run sees epoch 2's batches
    assert served[:3] != served[3:6]        # each epoch is reshuffled


class _KillAt(keras.callbacks.Callback):
    """Simulates a kill at the start of an epoch."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_training_learns_keeps_the_best_epoch_and_resumes_exactly(tmp_path):
    x, y, xv, yv = _tiny_data(seed=1)
    # lr patience 1, early-stopping patience 3: the learning rate drops and training stops early
    # (after 4 of 6 epochs), so both callbacks' counters must survive a kill after epoch 2.
    config = ClassifierConfig(epochs=6, lr_patience=1, early_stopping_patience=3, **TINY)
    whole, history = train_classifier(x, y, xv, yv, 3, config, seed=0, verbose=0)
    assert history["epochs_run"] == len(history["val_accuracy"]) == 4, history
    assert max(history["val_accuracy"]) > 0.5  # chance is 1/3
    assert min(history["learning_rate"]) < 1e-3
    best = history["best_epoch"]
    assert history["val_accuracy"][best - 1] == max(history["val_accuracy"])
    assert evaluate_classifier(whole, xv, yv, ["a", "b", "c"])["top1"] == pytest.approx(
        history["val_accuracy"][best - 1], abs=1e-6)  # the best epoch's weights were kept

    with pytest.raises(KeyboardInterrupt):
        train_classifier(x, y, xv, yv, 3, config, seed=0, verbose=0, checkpoint_dir=tmp_path,
                         extra_callbacks=[_KillAt(2)])
    assert _files_under(tmp_path) == ["resume_state.npz"]
    resumed, resumed_history = train_classifier(x, y, xv, yv, 3, config, seed=0, verbose=0,
                                                checkpoint_dir=tmp_path)
    # Same seed, same run: a kill and a resume change nothing, bit for bit.
    assert resumed_history == history
    assert all(np.array_equal(a, b) for a, b in zip(whole.get_weights(), resumed.get_weights()))
    assert _files_under(tmp_path) == ["history.csv", "resnet20.weights.h5", "run.json"]
    lines = (tmp_path / "history.csv").read_text().splitlines()
    assert len(lines) == 1 + history["epochs_run"] and lines[0].startswith("epoch,")

    loaded, run = load_classifier(tmp_path)
    assert run["epochs_run"] == history["epochs_run"] and run["best_epoch"] == best
    np.testing.assert_array_equal(loaded.predict(xv, verbose=0), whole.predict(xv, verbose=0))


def test_a_pooled_model_trains_to_a_fresh_models_weights_bit_for_bit():
    x, y, xv, yv = _tiny_data(seed=1)
    config = ClassifierConfig(epochs=3, lr_patience=1, **TINY)
    fresh, fresh_history = train_classifier(x, y, xv, yv, 3, config, seed=0, verbose=0)

    pool = ClassifierPool()
    # Another seed and other batches first, so the pooled model has weights, Adam moments and a step
    # count of its own to be reset, and a learning rate as a plateau leaves it.
    first, _ = train_classifier(x[:50], y[:50], xv, yv, 3, config, seed=1, verbose=0, pool=pool)
    first.optimizer.learning_rate = config.learning_rate * config.lr_factor
    keras.backend.clear_session()  # the pipeline clears the session between its stages
    pooled, pooled_history = train_classifier(x, y, xv, yv, 3, config, seed=0, verbose=0, pool=pool)

    assert pooled is first and len(pool) == 1  # lent again, not built again
    assert pooled_history == fresh_history
    assert all(np.array_equal(a, b) for a, b in zip(fresh.get_weights(), pooled.get_weights()))
    assert all(np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
               for a, b in zip(fresh.optimizer.variables, pooled.optimizer.variables))

    # Another kind of model (here: four classes) is compiled for itself.
    four = pool.lend(x.shape[1:], 4, config)
    assert four is not pooled and four.output_shape[-1] == 4 and len(pool) == 2


def test_resume_file_of_another_run_is_ignored(tmp_path, capsys):
    x, y, xv, yv = _tiny_data(seed=2)
    config = ClassifierConfig(epochs=2, **TINY)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(x, y, xv, yv, 3, config, seed=0, verbose=0, checkpoint_dir=tmp_path,
                         extra_callbacks=[_KillAt(1)])
    killed = load_resume_history(tmp_path)
    # Another seed is another run: it starts from epoch 0 instead of resuming the seed-0 run.
    _, history = train_classifier(x, y, xv, yv, 3, config, seed=1, verbose=0, checkpoint_dir=tmp_path)
    assert "ignoring" in capsys.readouterr().out
    assert history["epochs_run"] == 2 and history["loss"][0] != killed["loss"][0]
    assert json.loads((tmp_path / "run.json").read_text())["seed"] == 1


def load_resume_history(folder):
    with np.load(Path(folder) / "resume_state.npz") as data:
        return json.loads(str(data["state_json"]))["history"]


# -------------------------------------------------------------- evaluation ----

def test_evaluation_on_known_probabilities():
    names = [f"c{i}" for i in range(7)]
    probs = np.full((4, 7), 0.01, np.float32)
    probs[0, [0, 1]] = [0.5, 0.3]          # true 0: top-1 right
    probs[1, [2, 1, 3, 4, 5, 6]] = [0.4, 0.2, 0.15, 0.1, 0.06, 0.05]  # true 1: rank 2 → top-5
    probs[2, [2, 3, 4, 5, 6, 0]] = [0.3, 0.25, 0.2, 0.1, 0.09, 0.03]  # true 0: rank 6 → miss
    probs[3, 3] = 0.9                      # true 3: right
    result = evaluate_classifier(_identity_model(7), probs, [0, 1, 0, 3], names)
    assert result["top1"] == pytest.approx(0.5) and result["top5"] == pytest.approx(0.75)
    assert result["top_k"] == 5 and result["n"] == 4
    assert result["per_class_accuracy"] == {"c0": 0.5, "c1": 0.0, "c2": None, "c3": 1.0,
                                            "c4": None, "c5": None, "c6": None}
    assert result["balanced_accuracy"] == pytest.approx(0.5)
    cm = np.array(result["confusion_matrix"])
    assert cm.shape == (7, 7) and cm.sum() == 4
    assert cm[0, 0] == 1 and cm[0, 2] == 1 and cm[1, 2] == 1 and cm[3, 3] == 1


def test_top5_is_capped_for_two_classes():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], np.float32)
    result = evaluate_classifier(_identity_model(2), probs, [0, 1, 1], ["benign", "malignant"])
    assert result["top_k"] == 2
    assert result["top1"] == pytest.approx(2 / 3) and result["top5"] == 1.0
    assert result["per_class_accuracy"] == {"benign": 1.0, "malignant": 0.5}


# ----------------------------------------------------------- results file ----

def test_record_replaces_one_run_and_keeps_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    record_cas(3, "digits", "real", {"top1": 0.9, "old_field": 1})
    record_cas(3, "digits", "x1", {"top1": 0.5})
    record_cas(3, "cifar10", "x1", {"top1": 0.7})
    record_cas(3, "digits", "real", {"top1": 0.95})
    assert load_cas(3) == {"digits": {"real": {"top1": 0.95}, "x1": {"top1": 0.5}},
                           "cifar10": {"x1": {"top1": 0.7}}}
    assert run_key_for() == "real" and run_key_for(4, True) == "x4"
    assert run_key_for(2, True, "my impl") == "my-impl_x2" and run_key_for(None, True, "sd_xl") == "sd_xl_all"


def test_concurrent_records_lose_nothing(tmp_path):
    code = (
        "import sys; sys.path.insert(0, {repo!r})\n"
        "from Metrics.cas import record_cas\n"
        "for i in range(40):\n"
        "    record_cas(0, 'digits', f'{{sys.argv[1]}}_x{{i}}', {{'top1': i / 40, 'pad': 'x' * 2000}})\n"
    ).format(repo=str(REPO))
    env = dict(os.environ, SDDG_OUTPUT_ROOT=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code, name], env=env, stderr=subprocess.PIPE, text=True)
             for name in ("a", "b", "c")]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    table = json.loads((tmp_path / "CAS Results" / "test_accuracies_exp0.json").read_text())
    assert sorted(table["digits"]) == sorted(f"{n}_x{i}" for n in "abc" for i in range(40))
    assert not [p for p in (tmp_path / "CAS Results").iterdir() if ".tmp" in p.name]


def test_plot_draws_the_published_curve_beside_ours(tmp_path, monkeypatch):
    if not PUBLISHED_CAS_JSON.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{PUBLISHED_CAS_JSON} is missing")
        pytest.skip(f"{PUBLISHED_CAS_JSON} is missing")
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    assert published_cas("retinamnist")["x4"]["top1"] == pytest.approx(0.52)
    record_cas(0, "retinamnist", "real", {"top1": 0.47, "top5": 1.0})
    record_cas(0, "retinamnist", "x2", {"top1": 0.44, "top5": 1.0})
    record_cas(0, "retinamnist", "x1", {"top1": 0.41, "top5": 1.0})
    record_cas(0, "retinamnist", "other_x1", {"top1": 0.40, "top5": 1.0})
    fig = cas_figure(0, "retinamnist")
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert "paper, synthetic top-1" in labels and "ours, synthetic top-1" in labels
    assert "other top-1" in labels and any(l.startswith("paper, real top-1 (45.8%)") for l in labels)
    ours = ax.get_lines()[labels.index("ours, synthetic top-1")]
    assert list(ours.get_xdata()) == [1, 2] and list(ours.get_ydata()) == [0.41, 0.44]
    paper = ax.get_lines()[labels.index("paper, synthetic top-1")]
    assert list(paper.get_xdata()) == list(range(1, 11))
    # digits is not a paper dataset: no published curve.
    record_cas(0, "digits", "real", {"top1": 0.9, "top5": 1.0})
    assert not any("paper" in line.get_label() for line in cas_figure(0, "digits").axes[0].get_lines())


# --------------------------------------------------- classifier_training.py ----

def _cas(root, dataset, key, exp=0):
    return json.loads((Path(root) / "CAS Results" / f"test_accuracies_exp{exp}.json").read_text())[dataset][key]


def test_script_digits_end_to_end_and_reuse(run_script, tmp_path):
    args = ["--dataset", "digits", "--synthetic", "False", "--epochs", "2", "--batch_size", "128",
            "--initial_filters", "8"]
    first = run_script("classifier_training.py", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    result = _cas(tmp_path, "digits", "real")
    assert result["n"] == 360 and result["top_k"] == 5 and result["n_train"] == 1077
    assert result["epochs_run"] == 2 and result["seed"] == 0 and result["initial_filters"] == 8
    assert result["top1"] > 0.3  # chance is 0.1
    assert list(result["per_class_accuracy"]) == [str(d) for d in range(10)]
    assert np.array(result["confusion_matrix"]).sum() == 360
    assert "resize_method" not in result  # real data is not resized
    run_dir = tmp_path / "Checkpoints" / "Classifiers" / "Exp_0" / "digits" / "real"
    assert _files_under(run_dir) == ["history.csv", "resnet20.weights.h5", "run.json"]
    assert (tmp_path / "CAS Results" / "cas_digits_exp0.png").stat().st_size > 10_000

    weights = run_dir / "resnet20.weights.h5"
    stamp = weights.stat().st_mtime_ns
    again = run_script("classifier_training.py", *args, "--train", "False")
    assert again.returncode == 0, again.stderr[-3000:]
    assert weights.stat().st_mtime_ns == stamp  # reused, not retrained
    assert _cas(tmp_path, "digits", "real")["top1"] == result["top1"]


def test_script_real_retinamnist_short_run(run_script, tmp_path, retinamnist_dir):
    r = run_script("classifier_training.py", "--dataset", "retinamnist", "--no-synthetic", "--data_dir", retinamnist_dir,
                   "--epochs", "1", "--initial_filters", "16", "--exp", "7")
    assert r.returncode == 0, r.stderr[-3000:]
    result = _cas(tmp_path, "retinamnist", "real", exp=7)
    assert result["n"] == 400 and result["n_train"] == 1080 and result["epochs_run"] == 1
    assert result["top_k"] == 5 and result["top5"] == 1.0  # 5 classes: top-5 always holds
    assert list(result["per_class_accuracy"]) == list(get_spec("retinamnist").label_names)
    assert np.array(result["confusion_matrix"]).sum(axis=1).tolist() == [174, 46, 92, 68, 20]
    assert (tmp_path / "CAS Results" / "cas_retinamnist_exp7.png").exists()


def test_script_scores_another_implementations_folder(run_script, tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "other_impl"
    for label in range(9):
        for i in range(12):
            size = (8, 16, 12)[i % 3]
            if i % 3 == 0:
                image = rng.integers(0, 256, (size, size), dtype=np.uint8)          # grey
            elif i % 3 == 1:
                image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)       # RGB
            else:
                image = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)       # RGBA
            _write_png(folder / f"class_{label:02d}" / f"img_{i}.png", image)
    (folder / "class_09").mkdir()                                                   # an empty class
    (folder / "class_03" / "broken.png").write_bytes(b"not a png at all")          # junk
    (folder / "class_03" / "notes.txt").write_text("generated with seed 1\n")
    r = run_script("classifier_training.py", "--dataset", "digits", "--synthetic_dir", folder,
                   "--epochs", "1", "--batch_size", "64", "--initial_filters", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "unreadable" in r.stdout and "class_03/broken.png" in r.stdout
    result = _cas(tmp_path, "digits", "other_impl_all")
    assert result["n_train"] == 9 * 12 and result["n"] == 360  # tested on the REAL test split
    assert result["resize_method"] == RESIZE_METHOD and result["source"] == str(folder)
    report = result["synthetic_report"]
    assert [f for f, _ in report["unreadable_files"]] == ["class_03/broken.png"]
    assert report["empty_classes"] == ["9 (9)"] and report["non_image_files"] == ["class_03/notes.txt"]
    assert report["resized_from"] == {"16x16": 36, "12x12": 36}


def test_script_synthetic_take_is_a_multiple_of_the_real_train_split(run_script, tmp_path):
    rng = np.random.default_rng(1)
    ours = tmp_path / "Data" / "Synthetic" / "Exp_0" / "digits"
    for label in range(10):
        for i in range(110):
            _write_png(ours / f"class_{label:02d}" / f"img_{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    r = run_script("classifier_training.py", "--dataset", "digits", "--synthetic", "--take", "1",
                   "--epochs", "1", "--batch_size", "128", "--initial_filters", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    result = _cas(tmp_path, "digits", "x1")
    assert result["n_train"] == 1077 and result["take"] == 1
    assert sorted(result["synthetic_report"]["counts"].values()) == [107] * 3 + [108] * 7
    assert (tmp_path / "Checkpoints" / "Classifiers" / "Exp_0" / "digits" / "x1" / "run.json").exists()
    # x2 would need 216 images of a class that has 110: one line, nothing written for x2.
    r2 = run_script("classifier_training.py", "--dataset", "digits", "--synthetic", "--take", "2",
                    "--epochs", "1", "--initial_filters", "4")
    assert "take=2154" in _one_error_line(r2)
    assert not (tmp_path / "Checkpoints" / "Classifiers" / "Exp_0" / "digits" / "x2").exists()
    assert list(load_cas_from(tmp_path)["digits"]) == ["x1"]


def load_cas_from(root):
    return json.loads((Path(root) / "CAS Results" / "test_accuracies_exp0.json").read_text())


@pytest.mark.parametrize("case", ["unknown_dataset", "missing_npz", "corrupt_npz", "take_0", "take_without_synthetic",
                                  "no_train_without_checkpoint", "missing_synthetic_dir", "nothing_to_do"])
def test_script_bad_input_is_one_line_and_writes_nothing(run_script, tmp_path, case):
    data = tmp_path / "data"
    data.mkdir()
    env = {"SDDG_DATA_MIRROR": "file:///nonexistent-mirror"}  # never download in a test
    args = {
        "unknown_dataset": ["--dataset", "imagenet"],
        "missing_npz": ["--dataset", "retinamnist", "--synthetic", "False", "--data_dir", data],
        "corrupt_npz": ["--dataset", "retinamnist", "--synthetic", "False", "--data_dir", data],
        "take_0": ["--dataset", "digits", "--synthetic", "--take", "0"],
        "take_without_synthetic": ["--dataset", "digits", "--synthetic", "False", "--take", "2"],
        "no_train_without_checkpoint": ["--dataset", "digits", "--no-synthetic", "--no-train"],
        "missing_synthetic_dir": ["--dataset", "digits", "--synthetic_dir", tmp_path / "nowhere"],
        "nothing_to_do": ["--dataset", "digits", "--no-train", "--no-test"],
    }[case]
    if case == "corrupt_npz":
        (data / "retinamnist.npz").write_bytes(b"PK\x03\x04 truncated")
    before = _files_under(tmp_path)
    line = _one_error_line(run_script("classifier_training.py", *args, env=env))
    expected = {"unknown_dataset": "imagenet", "missing_npz": "retinamnist.npz", "corrupt_npz": "not a readable MedMNIST npz",
                "take_0": "--take", "take_without_synthetic": "--take", "no_train_without_checkpoint": "--train",
                "missing_synthetic_dir": "nowhere", "nothing_to_do": "nothing to do"}[case]
    assert expected in line
    assert _files_under(tmp_path) == before


@pytest.mark.slow
def test_script_killed_process_resumes(run_script, tmp_path):
    """SIGKILL during training, rerun the same command: same history as an uninterrupted run."""
    args = ["--dataset", "digits", "--no-synthetic", "--epochs", "5", "--batch_size", "64", "--initial_filters", "8"]
    whole = run_script("classifier_training.py", *args, "--exp", "1")
    assert whole.returncode == 0, whole.stderr[-3000:]
    env = dict(os.environ, SDDG_OUTPUT_ROOT=str(tmp_path), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "classifier_training.py"), *args, "--exp", "2"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = tmp_path / "Checkpoints" / "Classifiers" / "Exp_2" / "digits" / "real" / "resume_state.npz"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            with np.load(state) as data:
                if json.loads(str(data["state_json"]))["epoch"] >= 2:
                    break
        time.sleep(0.2)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "CAS Results" / "test_accuracies_exp2.json").exists()
    resumed = run_script("classifier_training.py", *args, "--exp", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    history = lambda exp: (tmp_path / "Checkpoints" / "Classifiers" / f"Exp_{exp}" / "digits" / "real"
                           / "history.csv").read_text()
    assert history(2) == history(1)
    assert _cas(tmp_path, "digits", "real", exp=2)["top1"] == _cas(tmp_path, "digits", "real", exp=1)["top1"]
