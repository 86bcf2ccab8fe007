"""Evaluation: dataset loaders, the resumable evaluation runner, statistics and plots.

``load_dataset(name)`` gives MCQuestion lists; ``EvaluationRunner(provider, pair).run(questions, alphas)``
asks the base once and scores the pair once per question, then derives every system's answers;
``stats`` has Wilson CIs, McNemar's exact test and a paired bootstrap; ``plots`` draws sweeps and weeks.
"""

from .datasets import DATASETS, DatasetError, load_dataset, load_realtimeqa
from .runner import EvalResult, EvaluationRunner, load_run
from .stats import accuracy, mcnemar_exact, paired_bootstrap, wilson_interval

__all__ = [
    "DATASETS",
    "DatasetError",
    "EvalResult",
    "EvaluationRunner",
    "accuracy",
    "load_dataset",
    "load_realtimeqa",
    "load_run",
    "mcnemar_exact",
    "paired_bootstrap",
    "wilson_interval",
]
