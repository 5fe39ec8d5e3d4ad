"""Direct measurement of what an accumulator loses, with the real kernels on real data.

The analysis of :mod:`tfaccum.analysis.vrr` predicts the variance retention of a GEMM from
a model of its products (i.i.d., zero-mean Gaussian). This module measures the same
quantity on a layer's actual operands: it computes the layer's three GEMMs (numerics.md
section 5) on its input ``x`` and the error ``dz`` at its pre-activation output twice,
under an accumulation policy and exactly (float32 accumulation of the same rounded
operands), and compares them. Both :func:`tfaccum.analysis.predict` (where the model is
off) and the training driver's health probe use it, so the analysis and the monitor
measure one and the same thing.

Per GEMM (``fwd``: ``y = x.w``, ``bwd``: ``dx = dz.w^T``, ``grad``: ``dw = x^T.dz``):

* ``retention = 1 - mean((emulated - exact)^2) / var(exact)``: the VRR as the analysis
  defines it (every error counts as loss; at most 1);
* ``variance_ratio = var(emulated) / var(exact)``: can exceed 1, because rounding noise
  adds variance; kept because it shows swamping (values < 1) directly;
* ``rel_error = ||emulated - exact|| / ||exact||``;
* ``loss_stderr``: the standard error of ``1 - retention`` over the outputs measured.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Mapping

import numpy as np

from tfaccum.analysis.plan import GEMMS
from tfaccum.config import AccumPolicy

__all__ = ["GemmProbe", "GemmErrors", "accum_twin_class", "falls_short"]


def accum_twin_class(layer) -> type:
    """The tfaccum class that computes ``layer``'s GEMMs (``AccumDense``, ``AccumConv2D``,
    ...: a layer of :data:`tfaccum.inventory.SINGLE_GEMM`, or a subclass of one)."""
    from tfaccum.inventory import SINGLE_GEMM
    from tfaccum.layers import TWINS

    for base, twin in TWINS.items():
        if isinstance(layer, base) and issubclass(base, SINGLE_GEMM):
            return twin
    raise TypeError(f"layer {layer.name!r} is a {type(layer).__name__}, not a layer of one "
                    "GEMM set (Dense, or a 1-D/2-D, depthwise or transposed convolution)")


@dataclasses.dataclass
class GemmErrors:
    """Sums over outputs of one GEMM's errors; add batches with ``+=``."""

    count: int = 0          # outputs
    sum_exact: float = 0.0  # sum of exact outputs
    sum_exact_sq: float = 0.0
    sum_emulated: float = 0.0
    sum_emulated_sq: float = 0.0
    sum_err_sq: float = 0.0
    sum_err_4: float = 0.0  # for the standard error of the mean squared error

    @classmethod
    def of(cls, emulated: np.ndarray, exact: np.ndarray) -> "GemmErrors":
        emulated = np.asarray(emulated, np.float64).ravel()
        exact = np.asarray(exact, np.float64).ravel()
        err2 = (emulated - exact) ** 2
        return cls(count=exact.size, sum_exact=float(exact.sum()),
                   sum_exact_sq=float(np.dot(exact, exact)),
                   sum_emulated=float(emulated.sum()),
                   sum_emulated_sq=float(np.dot(emulated, emulated)),
                   sum_err_sq=float(err2.sum()), sum_err_4=float(np.dot(err2, err2)))

    def __iadd__(self, other: "GemmErrors") -> "GemmErrors":
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        return self

    def _var(self, total: float, total_sq: float) -> float:
        if self.count == 0:
            return math.nan
        mean = total / self.count
        return max(0.0, total_sq / self.count - mean * mean)

    @property
    def exact_variance(self) -> float:
        return self._var(self.sum_exact, self.sum_exact_sq)

    @property
    def mse(self) -> float:
        return self.sum_err_sq / self.count if self.count else math.nan

    @property
    def retention(self) -> float:
        var = self.exact_variance
        return 1.0 - self.mse / var if var > 0 else math.nan

    @property
    def variance_ratio(self) -> float:
        var = self.exact_variance
        return self._var(self.sum_emulated, self.sum_emulated_sq) / var if var > 0 else math.nan

    @property
    def rel_error(self) -> float:
        return math.sqrt(self.sum_err_sq / self.sum_exact_sq) if self.sum_exact_sq > 0 \
            else math.nan

    @property
    def loss_stderr(self) -> float:
        """Standard error of ``1 - retention`` (the outputs' squared errors as a sample)."""
        var = self.exact_variance
        if self.count < 2 or not var > 0:
            return math.nan
        mean = self.mse
        spread = max(0.0, self.sum_err_4 / self.count - mean * mean)
        return math.sqrt(spread / (self.count - 1)) / var

    def summary(self) -> Dict[str, float]:
        return {"retention": self.retention, "variance_ratio": self.variance_ratio,
                "rel_error": self.rel_error, "loss_stderr": self.loss_stderr}


class GemmProbe:
    """The bare GEMMs (no bias, no activation) of one layer of one GEMM set (Dense, a
    1-D/2-D, depthwise or transposed convolution), emulated under a policy and exact, on
    the layer's current kernel.

    ``layer`` may be a native Keras layer or a tfaccum layer. The exact twin rounds the
    operands as ``policy`` does and accumulates in float32 (``AccumPolicy(operands=...)``).
    """

    def __init__(self, layer, policy: AccumPolicy, input_shape=None):
        self.layer = layer
        cls = accum_twin_class(layer)
        config = {k: v for k, v in layer.get_config().items() if k != "policy"}
        # Only the bare GEMM: no bias, activation, regularizer or constraint (whose keys
        # differ by class: kernel_..., depthwise_...).
        config.update({k: None for k in config
                       if k.endswith(("_regularizer", "_constraint"))})
        config.update(use_bias=False, activation="linear")
        self.emulated = cls.from_config({**config, "name": f"{layer.name}_probe_emulated",
                                         "policy": policy.to_dict()})
        self.exact = cls.from_config({**config, "name": f"{layer.name}_probe_exact",
                                      "policy": AccumPolicy(operands=policy.operands).to_dict()})
        shape = input_shape if input_shape is not None else tuple(layer.input.shape)
        for twin in (self.emulated, self.exact):
            twin.build(tuple(shape))

    @property
    def policy(self) -> AccumPolicy:
        return self.emulated.policy

    @policy.setter
    def policy(self, value: AccumPolicy):
        self.emulated.policy = value
        self.exact.policy = AccumPolicy(operands=value.operands)

    def _gemms(self, twin, x, dz) -> Dict[str, np.ndarray]:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(x)
            y = twin(x)
        dx, dw = tape.gradient(y, [x, twin.kernel], output_gradients=dz)
        return {"fwd": y.numpy(), "bwd": dx.numpy(), "grad": dw.numpy()}

    def sync(self):
        """Copy the layer's current kernel into both twins (before any use of them)."""
        for twin in (self.emulated, self.exact):
            twin.kernel.assign(self.layer.kernel)

    def compare(self, x, dz) -> Dict[str, GemmErrors]:
        """``{gemm: GemmErrors}`` of one batch: ``x`` the layer's input, ``dz`` the error at
        its pre-activation output."""
        import tensorflow as tf

        x = tf.convert_to_tensor(x, tf.float32)
        dz = tf.convert_to_tensor(dz, tf.float32)
        self.sync()
        emulated = self._gemms(self.emulated, x, dz)
        exact = self._gemms(self.exact, x, dz)
        return {g: GemmErrors.of(emulated[g], exact[g]) for g in GEMMS}


def summaries(errors: Mapping[str, GemmErrors]) -> Dict[str, Dict[str, float]]:
    return {g: e.summary() for g, e in errors.items()}


#: The tolerance of docs/vrr.md section 9, by which the analytical loss ``L = n (1 - VRR)``
#: and a Monte Carlo measurement of it may differ: ``0.30 L_mc + 0.05 + 3 stderr``.
TOLERANCE_RELATIVE = 0.30
TOLERANCE_ABSOLUTE = 0.05


def falls_short(predicted: float, measured: float, n_eff: int,
                loss_stderr: float = 0.0) -> bool:
    """Whether a measured retention falls short of the predicted one by more than the
    Monte Carlo tolerance of docs/vrr.md section 9, in units of the loss
    ``L = n_eff (1 - retention)``: ``L_measured - L_predicted > 0.30 L_measured + 0.05 +
    3 n_eff stderr``. A retention above the prediction never falls short."""
    if not (math.isfinite(predicted) and math.isfinite(measured)) or n_eff <= 0:
        return False
    stderr = loss_stderr if math.isfinite(loss_stderr) else 0.0
    l_pred = n_eff * (1.0 - predicted)
    l_meas = n_eff * (1.0 - measured)
    return l_meas - l_pred > TOLERANCE_RELATIVE * l_meas + TOLERANCE_ABSOLUTE \
        + 3.0 * n_eff * stderr
