"""Training: the stage loop over a task sequence, online selection inside the HF Trainer, baselines.

* :func:`run_training` - every method and seed of a config through its task sequence.
* :class:`GradsiftTrainer` - ``transformers.Trainer`` with the selection step and the baselines' losses.
* :class:`ModerateGiTrainer` - drop-in ``Trainer`` that trains on Moderate-G_i samples only.
* :func:`load_config` - the validated YAML config.
"""

from gradsift.train.config import ConfigError, RunConfig, load_config
from gradsift.train.stages import run_training, train_command
from gradsift.train.trainer import GradsiftTrainer, ModerateGiTrainer, NonFiniteLossError

__all__ = [
    "ConfigError",
    "GradsiftTrainer",
    "ModerateGiTrainer",
    "NonFiniteLossError",
    "RunConfig",
    "load_config",
    "run_training",
    "train_command",
]


def __getattr__(name):  # trl is optional
    if name == "ModerateGiSFTTrainer":
        from gradsift.train import trainer

        return trainer.ModerateGiSFTTrainer
    raise AttributeError(name)
