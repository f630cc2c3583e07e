"""Evaluation: task metrics, continual-learning metrics, capability benchmarks, safety."""

from gradsift.eval.forgetting import forgetting, interference, mean_over_stages, results_to_matrix
from gradsift.eval.metrics import (
    TASK_METRICS,
    exact_match,
    gsm8k_em,
    gsm8k_extract,
    mcq_accuracy,
    mcq_letter,
    rouge_l,
    score_task,
    squad_v2_scores,
)

__all__ = [
    "TASK_METRICS", "exact_match", "gsm8k_em", "gsm8k_extract", "mcq_accuracy", "mcq_letter", "rouge_l",
    "score_task", "squad_v2_scores", "forgetting", "interference", "mean_over_stages", "results_to_matrix",
]

__all__ += ["EvalConfig", "evaluate", "make_eval_hook", "rejudge"]


def __getattr__(name):  # the runner imports torch and the generation stack: load it on first use
    if name in ("EvalConfig", "evaluate", "make_eval_hook", "rejudge"):
        from gradsift.eval import runner

        return getattr(runner, name)
    raise AttributeError(name)
