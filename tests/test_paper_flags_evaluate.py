"""evaluate_dataset.py (ours): `--exp` is the paper's identifier; the stage knows when it is done."""

import evaluate_dataset
from Pipeline.evaluate import SCRIPT, EvaluateSettings, is_done
from Utils.io import merge_json
from Utils.paths import quality_results_json


def parse(*words):
    return EvaluateSettings.from_namespace(evaluate_dataset.parser.parse_args(list(words)))


def test_exp_is_kept_as_written_and_our_folder_is_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    s = parse("--dataset", "digits", "--exp", "0001")
    assert s.exp == "0001" and s.measured_folder().parts[-3:] == ("Synthetic", "Exp_0001", "digits")
    assert s.command(SCRIPT) == "python evaluate_dataset.py --dataset digits --exp 0001"
    assert EvaluateSettings.from_argv(s.to_argv()) == s


def test_is_done_when_this_folder_extractor_and_settings_are_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    s = parse("--dataset", "digits", "--seed", "3")
    assert is_done(s) is None
    stored = {"num_samples": s.num_samples, "seed": 3, "reference_split": "test", "k": s.k,
              "kid_subsets": s.kid_subsets, "kid_subset_size": s.kid_subset_size,
              "memorization_threshold": s.memorization_threshold}
    merge_json(quality_results_json("0"), {"digits": {"Data/Synthetic/Exp_0/digits": {"resnet20": {"settings": stored}}}})
    assert "recorded" in is_done(s)
    assert is_done(s.replace(seed=4)) is None and is_done(s.replace(features="inception")) is None
    assert is_done(s.replace(reference="val")) is None
