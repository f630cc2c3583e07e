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

from gradsift.eval.runner import EvalConfig, evaluate, make_eval_hook, rejudge  # noqa: E402

__all__ += ["EvalConfig", "evaluate", "make_eval_hook", "rejudge"]
