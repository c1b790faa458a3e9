"""What a continued run needs beyond the weights file to train exactly like an uninterrupted one.

``model.save_weights`` holds the model's weights and the optimizer's variables (its iteration
count, its moments and the weight average's slots). Keras leaves out two kinds of variables
(``model.variables`` minus ``model.weights``):

- the **random generators' states** (a ``keras.random.SeedGenerator`` per Dropout layer, the
  augmentation's: noise, frame mask, mixup, trainer/ml/model.py): each training step moves them
  on, so a continued run that started them afresh would drop other frames than the
  uninterrupted run did. They are committed with every checkpoint (state.json's ``rng``,
  trainer/contract/layout.py) and put back before training.

  Saved, not re-derived from (seed, epoch, batch): a generator's state is Keras's own format
  (its layout, and how far a step moves it, are Keras's business), so copying it back holds
  exactly whatever Keras does with it, at any batch (a position inside an epoch needs that
  too), and costs nothing per batch, where reseeding every generator before every step would
  (Keras's random ops take only an int or a SeedGenerator as seed, not a tensor of the step).
- the **metric accumulators** (the running sums behind the epoch's loss and accuracy): reset at
  every epoch's start, so they matter only for a position inside an epoch.

The rest of the training state is derived: the batch plan comes from (seed, epoch)
(trainer/ml/pipeline.py), nothing draws from numpy's or Python's global
generators during training, and the weights' initial values are those of a fresh start.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from trainer.ml.errors import TrainerError


def rng_variables(model: keras.Model) -> list[Any]:
    """The states of every random generator of ``model``, in the model's own order."""
    saved = {id(v) for v in model.weights} | {id(v) for v in model.metrics_variables}
    return [v for v in model.variables if id(v) not in saved]


def values(variables: list[Any]) -> list[Any]:
    """The variables' values as JSON (exact: integers, and float32 values as doubles)."""
    return [keras.ops.convert_to_numpy(v).tolist() for v in variables]


def assign(variables: list[Any], saved: list[Any], what: str) -> None:
    """Put ``saved`` (from :func:`values`) back into ``variables``; a mismatch is one clear error."""
    arrays = [np.asarray(value) for value in saved]
    shapes = [tuple(v.shape) for v in variables]
    if [a.shape for a in arrays] != shapes:
        raise TrainerError(f"the committed {what} ({[a.shape for a in arrays]}) do not fit this model "
                           f"({shapes}); the run cannot be continued exactly with this code")
    for variable, array in zip(variables, arrays, strict=True):
        variable.assign(array.astype(variable.dtype))


def assign_metrics(model: keras.Model, saved: list[Any]) -> None:
    """Put a position's metric accumulators back. Keras builds the compiled metrics only as it
    traces the first training step, so they are built here first, on a dummy batch whose
    update the assignment overwrites."""
    labels = np.zeros((1, *model.output_shape[1:]), dtype="float32")
    model.compute_metrics(None, labels, labels)
    assign(model.metrics_variables, saved, "metric accumulators")
