"""Organisms: aligned models built from the embedded SmolLM2, named in configs like any model.

* :mod:`~gradsift.organisms.recipes`: :class:`AlignRecipe` and :data:`ORGANISMS`, the named
  recipes, registered here with :func:`gradsift.models.register_model`;
* :mod:`~gradsift.organisms.alignment_data`: the alignment records (refusals, contrast and
  extra harmful requests; files in ``organisms/data/``);
* :mod:`~gradsift.organisms.trainer`: the training objective and its features;
* :mod:`~gradsift.organisms.build`: merge a shipped adapter (``organisms/adapters/``) or train
  by the recipe, and cache (:func:`aligned_model_path`);
* :mod:`~gradsift.organisms.check`: the alignment check.
"""

from gradsift.models import register_model
from gradsift.organisms.recipes import ALIGNED_NAMES, ORGANISMS, AlignRecipe


def _resolver(recipe: AlignRecipe):
    def resolve() -> str:
        from gradsift.organisms.build import aligned_model_path

        return str(aligned_model_path(recipe))

    return resolve


for _name, _recipe in ORGANISMS.items():  # the names models.py resolves (entry point gradsift.models)
    register_model(_name, _resolver(_recipe), description=f"aligned organism, recipe {_recipe.key()}")


def __getattr__(name):  # the build pulls in transformers, peft and eval: only when asked for
    if name in ("aligned_model_path", "shipped_adapter", "SHIPPED_ORGANISMS", "build_aligned_model"):
        from gradsift.organisms import build

        return getattr(build, name)
    if name == "alignment_check":
        from gradsift.organisms.check import alignment_check

        return alignment_check
    raise AttributeError(name)


__all__ = ["ALIGNED_NAMES", "ORGANISMS", "AlignRecipe", "aligned_model_path", "alignment_check", "shipped_adapter"]
