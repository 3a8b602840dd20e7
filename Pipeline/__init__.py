"""The paper's pipeline as a library: Optuna tuning, the chained stages of `reproduce.py`, the report.

| module | what |
| --- | --- |
| `tune.py` | the tune stage (PAPER.md stages 2 and 4): `TuneSettings` (hyp_opt.py's flags), `is_done`, `run`, `winner_settings` |
| `tuning/` | its machinery, one file per concern: search space, images, objective, storage, workers (heartbeat), study (resume, several workers), results (winner, stage table JSON), plots |
| `stages.py` | class encoder -> tuning #1 -> UNet fine-tuning -> tuning #2 -> generation -> CAS -> report, each skipped when its outputs exist; the `quick` and `paper` budgets |
| `report.py` | `REPORT.md` with its PNG figures: CAS table and curve beside the paper's, tuning history, chosen settings, samples, quality metrics, commands and versions |

The scripts `hyp_opt.py` and `reproduce.py` are thin command lines over these.
"""
