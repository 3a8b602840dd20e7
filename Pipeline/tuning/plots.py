"""The paper's Optuna plots of a study, as PNG files.

history, contour of steps x UGS, contour of all three settings, importances,
slices, timeline, and the per-epoch validation curves the pruner saw, under
optimization_plots/Exp_{exp}/{dataset}/{enc|dif}/ (`plots_dir`).

Example:
    >>> save_study_plots(study, plots_dir("0", "digits", "enc"), "enc_epoch")
    {'history': PosixPath('optimization_plots/Exp_0/digits/enc/history.png'), ...}
"""

import warnings
from pathlib import Path

import numpy as np
import optuna

from Pipeline.tuning.space import STEPS_PARAM, UGS_PARAM
from Utils.paths import optimization_plots_dir


def save_study_plots(study, out_dir, checkpoint_param, log=print, value_label="objective value"):
    """The paper's Optuna plots as PNG files in out_dir; returns {name: path}.

    history, contour of steps x UGS, contour of all three settings, importances,
    slices, timeline, and the per-epoch validation curves the pruner saw. A plot
    Optuna cannot draw yet (e.g. importances from fewer than two completed trials)
    is skipped with a note.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    from Utils.io import atomic_path

    out_dir = Path(out_dir)
    plots = {
        "history": lambda: ovm.plot_optimization_history(study),
        "contour_steps_ugs": lambda: ovm.plot_contour(study, params=[STEPS_PARAM, UGS_PARAM]),
        "contour": lambda: ovm.plot_contour(study, params=[STEPS_PARAM, UGS_PARAM, checkpoint_param]),
        "importances": lambda: ovm.plot_param_importances(study),
        "slice": lambda: ovm.plot_slice(study),
        "timeline": lambda: ovm.plot_timeline(study),
        "intermediate_values": lambda: ovm.plot_intermediate_values(study),
    }
    saved = {}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "unique value length is less than 2" etc.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning on every matplotlib plot
        for name, draw in plots.items():
            try:
                axes = draw()
            except (ValueError, RuntimeError, ZeroDivisionError, IndexError, KeyError) as e:
                log(f"note: Optuna plot '{name}' skipped: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                continue
            figure = np.ravel(axes)[0].figure if isinstance(axes, np.ndarray) else axes.figure
            if not figure.axes or all(not ax.has_data() for ax in figure.axes):
                plt.close(figure)
                log(f"note: Optuna plot '{name}' skipped: nothing to draw yet")
                continue
            if name == "history":
                np.ravel(axes)[0].set_ylabel(value_label)
            figure.set_size_inches(max(figure.get_size_inches()[0], 8), max(figure.get_size_inches()[1], 5))
            path = out_dir / f"{name}.png"
            out_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
            plt.close(figure)
            saved[name] = path
    optuna.logging.set_verbosity(verbosity)
    return saved


def plots_dir(exp, dataset, stage, objective="cas"):
    """optimization_plots/Exp_{exp}/{dataset}/{enc|dif}/ (a kid/ sub-folder for the KID objective)."""
    folder = optimization_plots_dir(exp, dataset, stage)
    return folder / "kid" if objective == "kid" else folder

