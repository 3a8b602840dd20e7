"""Human judgement of a synthetic data set: a local "real or generated?" study page, and its report.

Serves one study page on this machine (http://127.0.0.1:8765/ by default). Each
rater opens it, enters an id, and answers: a real and a generated image of the
same class side by side, "which one is real?" (keys: left arrow or F, right
arrow or J), with attention checks mixed in (a real image beside pure noise)
and, with --realism_trials, single images rated 1-5. Every answer is saved as it
is given; a rater who reloads continues where they were, and several raters can
answer at once. Ctrl-C stops the server.

    python rate_dataset.py --dataset digits --synthetic_dir Data/Synthetic/Exp_0/digits --trials 40
    python rate_dataset.py --dataset digits --exp 0 --host 0.0.0.0 --port 8080   # our folder, other machines
    python rate_dataset.py --dataset digits --synthetic_dir Data/Synthetic/Exp_0/digits --trials 40 --report

--report (with the flags the page was served with) prints the fooling rate
(the share of pairs in which the generated image was picked as real; 50 % is
indistinguishable) overall and per class with 95 % Wilson intervals, the raters
and trials kept and excluded (more than --max_failed_checks failed attention
checks, or an unfinished study), and the agreement between raters (pairwise
agreement and Fleiss' kappa); it writes report.json beside the answers.
reproduce.py's REPORT.md shows the same for every study of its experiment.

Writes: Experiments/Exp_{exp}/{dataset}/ratings/{folder}-{hash}/ (study.json,
answers/{rater}.jsonl, report.json), or under --ratings_dir.

The stage itself is Pipeline/rating.py (`RatingSettings`, `run`).
"""

from Pipeline.rating import RatingSettings, run
from Utils.cli import run_cli
from Utils.settings import command_line

parser, main = command_line(RatingSettings, run, __doc__)

if __name__ == "__main__":
    run_cli(main)
