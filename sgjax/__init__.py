"""sgjax: decoupled training with synthetic gradients in JAX.

Pure ``(init, apply)`` layers (:mod:`sgjax.layers`), synthetic-gradient predictors
(:mod:`sgjax.predictors`), feedback methods and their wrappers (:mod:`sgjax.feedback`),
and :func:`split_at`, which cuts a network into independently updated stages that talk
only through messages, run by the schedules of :mod:`sgjax.train`. Every trainer
implements one contract (:mod:`sgjax.trainer`): ``init(key, batch)``,
``step(state, batch) -> (state, info)``, ``apply(state, x)``. On top of these:
complete unlock with synthetic inputs (:mod:`sgjax.unlock`), recurrent DNI
(:mod:`sgjax.recurrent`), networks at different rates (:mod:`sgjax.multirate`), the
stale-gradient optax transformation (:mod:`sgjax.optim`), and the pipelined Runner's
engine on several devices (:mod:`sgjax.mesh`) or processes (:mod:`sgjax.launch`). See the
README.
"""

from sgjax import (
    feedback,
    layers,
    losses,
    metrics,
    multirate,
    optim,
    predictors,
    recurrent,
    train,
    trainer,
    unlock,
)
from sgjax.feedback import Feedback, Target
from sgjax.layers import Layer
from sgjax.predictors import Predictor
from sgjax.split import Split, Stage, StageState, split_at
from sgjax.train import (
    Message,
    NonFiniteError,
    Runner,
    Schedule,
    TrainState,
    check_finite,
    fused,
    stochastic,
    sync,
)
from sgjax.trainer import Batch, Trainer, vmap_seeds

__version__ = "0.3.0"

__all__ = [
    "Batch", "Trainer", "trainer", "vmap_seeds",
    "Feedback", "Layer", "Message", "NonFiniteError", "Predictor", "Runner", "Schedule",
    "Split", "Stage",
    "StageState", "Target", "TrainState", "check_finite", "feedback", "fused", "layers",
    "losses", "metrics", "multirate", "optim", "predictors", "recurrent", "split_at",
    "stochastic", "sync", "train", "unlock",
]
