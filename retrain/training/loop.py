"""What the two gradient-trained stages share: the optimizer factory, and early stopping that
keeps the best state of the trained variables and puts it back at the end.

The minibatch head (training/head.py) and fine-tuning (training/finetune.py) both train for at
most some epochs, judge each epoch on validation images and stop after ``patience`` epochs
without improvement; what counts as an improvement is theirs to say.
"""

from __future__ import annotations

import math

from ..config import TrainConfig


def make_optimizer(config: TrainConfig, learning_rate: float):
    """``config.optimizer`` (adam or sgd with ``config.momentum``) at ``learning_rate``."""
    import keras

    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=config.momentum)
    return keras.optimizers.Adam(learning_rate=learning_rate)


class EarlyStopping:
    """Tracks the best epoch of ``variables`` (TensorFlow variables) and when to stop.

    ``update(epoch, loss, improved)`` after each epoch: ``improved`` defaults to "lower loss than
    the best so far"; an improvement snapshots the variables. ``stop`` is true after ``patience``
    epochs in a row without one (never when ``patience`` is 0). ``restore()`` puts the best
    snapshot back, or the state at construction when no epoch improved."""

    def __init__(self, variables, patience: int, best_loss: float = math.inf):
        self.variables = list(variables)
        self.patience = patience
        self.best_loss = best_loss
        self.best_epoch = 0
        self.best_state = None
        self.start_state = [v.numpy() for v in self.variables]
        self.wait = 0

    def update(self, epoch: int, loss: float, improved: bool | None = None) -> bool:
        improved = loss < self.best_loss if improved is None else improved
        if improved:
            self.best_loss, self.best_epoch, self.wait = loss, epoch, 0
            self.best_state = [v.numpy() for v in self.variables]
        else:
            self.wait += 1
        return improved

    @property
    def stop(self) -> bool:
        return bool(self.patience) and self.wait >= self.patience

    def restore(self) -> None:
        for variable, value in zip(self.variables, self.best_state if self.best_state is not None else self.start_state):
            variable.assign(value)


__all__ = ["make_optimizer", "EarlyStopping"]
