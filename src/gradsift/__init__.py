"""gradsift: keep an aligned LLM safe while fine-tuning it on a sequence of tasks.

Pipeline: data -> score (exact per-sample gradient norms G_i, losses L_i)
-> select (Moderate-G_i, Algorithm 1) -> train (stage loop) -> evaluate -> report.
"""

__version__ = "0.1.0"

__all__ = ["per_sample_grad_norms", "__version__"]


def __getattr__(name):  # lazy: `import gradsift` stays cheap
    if name == "per_sample_grad_norms":
        from gradsift.norms import per_sample_grad_norms

        return per_sample_grad_norms
    raise AttributeError(name)
