"""Workarounds that let Keras 3's ``Model.fit`` train under ``MultiWorkerMirroredStrategy``.

Keras 3 (3.15 here; keras-team/keras#20585, tensorflow/tensorflow#72388) fails at two places when a
``MultiWorkerMirroredStrategy`` spans more than one worker:

1. ``fit``/``evaluate`` first build the model's metrics symbolically from one batch, which
   they obtain with ``strategy.reduce("MEAN", batch, axis=None)``: a *structure* of
   ``PerReplica`` values, which ``CollectiveAllReduceStrategy`` cannot reduce ("Attempt to
   convert a value (PerReplica...) ... to a Tensor"). Only the batch's shapes and dtypes
   matter there, so the first local replica's values serve.
2. Every step's logs (scalar loss and metric results) are averaged across workers with
   ``strategy.reduce("MEAN", value, axis=0)``, which fails on scalars ("Invalid reduction
   dimension 0 for input with 0 dimensions"). They are averaged with ``axis=None``: the
   mean of the workers' values, each a mean over an equal share of the global batch.

:func:`patch_keras` installs both, once per process; the driver calls it only for
``--strategy=multi_worker``, whose processes are its own. Neither changes a number that
training computes: gradients and variables are reduced by the strategy as before.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_patched = False


def patch_keras() -> bool:
    """Installs the workarounds; returns False when this Keras lacks the patched parts
    (a Keras whose internals moved, presumably fixed: nothing is changed)."""
    global _patched
    with _lock:
        if _patched:
            return True
        try:
            from keras.src.backend.tensorflow import trainer as keras_trainer
        except ImportError:
            return False
        trainer_class = getattr(keras_trainer, "TensorFlowTrainer", None)
        reduce_per_replica = getattr(keras_trainer, "reduce_per_replica", None)
        multi_worker = getattr(keras_trainer, "_collective_all_reduce_multi_worker", None)
        if trainer_class is None or reduce_per_replica is None or multi_worker is None \
                or not hasattr(trainer_class, "_maybe_symbolic_build"):
            return False
        import tensorflow as tf

        original_build = trainer_class._maybe_symbolic_build

        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            strategy = self._distribute_strategy
            if strategy is None or iterator is None or not multi_worker(strategy):
                return original_build(self, iterator=iterator, data_batch=data_batch)
            for _, _, batches in iterator:
                batch = next(batches)
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v, batch)
                break
            with strategy.scope():
                self._symbolic_build(data_batch=data_batch)

        def _reduce_per_replica(values, strategy, reduction):
            if reduction in ("auto", "mean") and multi_worker(strategy):
                return tf.nest.map_structure(
                    lambda v: strategy.reduce("MEAN", v, axis=None), values)
            return reduce_per_replica(values, strategy, reduction)

        trainer_class._maybe_symbolic_build = _maybe_symbolic_build
        keras_trainer.reduce_per_replica = _reduce_per_replica
        _patched = True
        return True
