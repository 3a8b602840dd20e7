"""reproduce.py with the text conditioning methods, tiny and end to end: checkpoints, manifest, report.

Needs CLIP's vocabulary file (an installed open-clip-torch has it: requirements-dev.txt).
"""

import json
import subprocess
import sys

import pytest

from tests.test_reproduce import REPO, TINY_BUDGET_ON_A_SUBSET, _env

pytestmark = pytest.mark.scripts_without_graph_optimizer  # tests/conftest.py


@pytest.mark.parametrize("method", ["text", "textual_inversion"])
def test_reproduce_runs_a_text_method_to_a_report(tmp_path, method):
    pytest.importorskip("ftfy")
    done = subprocess.run([sys.executable, str(REPO / "reproduce.py"), *TINY_BUDGET_ON_A_SUBSET,
                           "--conditioning", method], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    settings = json.loads((tmp_path / "Checkpoints/DDPM/Exp_0/digits/MyEmbedding/settings.json").read_text())
    assert settings["conditioning"] == method and settings["context_length"] == 16  # tiny's text encoder
    assert settings["prompt_templates"][0] == "a photo of a {label}."
    manifest = json.loads((tmp_path / "Data/Synthetic/Exp_0/digits/manifest.json").read_text())
    assert manifest["settings"]["conditioning"] == method
    cas = json.loads((tmp_path / "CAS Results/test_accuracies_exp0.json").read_text())["digits"]
    assert cas["x1"]["conditioning"] == method
    report = (tmp_path / "Experiments/Exp_0/digits/REPORT.md").read_text()
    assert f"| conditioning | {method} |" in report
    assert f"--conditioning {method}" in done.stdout
