"""The paper's pipeline as a library: one module per stage, the chain of `reproduce.py`, the report.

Every stage has the same shape: `XSettings` (its script's flags, declared once,
frozen, `to_argv()` for the command line back), `is_done(settings)`,
`run(settings) -> XResult`, and `SCRIPT`, the root script that is its command line.

| module | stage | script |
| --- | --- | --- |
| `adapt.py` | class encoder / UNet fine-tuning (PAPER.md stages 1, 3) | `SD_adapting.py` |
| `tune.py` (machinery in `tuning/`) | Bayesian optimisation #1, #2 (stages 2, 4) | `hyp_opt.py` |
| `generate.py` | generation of a synthetic training set (stage 5) | `generate_dataset.py` |
| `cas.py` | the classification accuracy score | `classifier_training.py` |
| `evaluate.py` | quality metrics of a generated set | `evaluate_dataset.py` |
| `rating.py` (page in `rating_page/`) | human judgement: a local "real or generated?" study page and its report | `rate_dataset.py` |
| `stages.py` | all of them chained, resumable; the `quick` and `paper` budgets | `reproduce.py` |
| `report.py` | `REPORT.md` with its figures | (`reproduce.py`) |
| `common_settings.py` | the flags several stages share, with the paper's defaults | |
"""
