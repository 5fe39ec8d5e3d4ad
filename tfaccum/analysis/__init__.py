"""Accumulation bit-width analysis: how many accumulator mantissa bits each GEMM needs.

tfaccum's own take on the variance-retention analysis of Sakr et al., "Accumulation
Bit-Width Scaling For Ultra-Low Precision Training Of Deep Networks" (ICLR 2019)::

    >>> import tfaccum
    >>> from tfaccum import analysis
    >>> round(analysis.vrr(n=4608, acc_mantissa_bits=9, product_mantissa_bits=5), 4)
    0.9996
    >>> analysis.vrr_monte_carlo(n=4608, acc_mantissa_bits=9, product_mantissa_bits=5)
    VRREstimate(value=0.9995..., low=0.9994..., high=0.9996..., n=4608, m_acc=9, m_p=5, ...)
    >>> analysis.min_mantissa_bits(n=4608, product_mantissa_bits=5, chunk_size=64)
    6
    >>> model = tfaccum.models.digits_cnn()
    >>> plan = analysis.predict(model, batch_size=64, chunk_size=0, sparsity=None)
    >>> print(plan)
    Precision plan for digits_cnn: batch 64, products m_p=5, sequential, ...
    ...
    layer       |   n n_eff bits    VRR |   n n_eff bits    VRR |    n n_eff bits    VRR
    ...
    conv1       |   9     9    3 0.9972 | 144   144    5 0.9968 | 4096  4096    9 0.9996
    conv2       | 144   144    5 0.9968 | 288   288    6 0.9984 | 4096  4096    9 0.9996
    fc1         | 512   512    6 0.9971 |  64    64    5 0.9986 |   64    64    5 0.9986
    predictions |  64    64    5 0.9986 |  10    10    3 0.9968 |   64    64    5 0.9986
    ...
    >>> emulated = tfaccum.rewrite(model, plan.shift(-1))    # one bit fewer everywhere

* :func:`vrr` / :func:`variance_lost`: the analytical variance retention ratio
  ``VRR = 1 - E[(computed - exact)^2] / Var(exact)`` of an accumulation of ``n`` Gaussian
  products with ``m_p`` mantissa bits in an accumulator with ``m_acc`` (docs/vrr.md).
* :func:`vrr_monte_carlo`: the same quantity measured with tfaccum's kernels, with a
  confidence interval.
* :func:`min_mantissa_bits`: the smallest ``m_acc`` that passes the criterion: by default
  ``"bounded"``, ``exp(n (1 - VRR)) < cutoff`` and ``1 - VRR <= 0.56 %``; ``"paper"``,
  the first part only (docs/vrr.md 2b); for any ``rounding`` mode.
* :func:`predict` / :func:`measure_statistics`: per-layer FWD/BWD/GRAD lengths, measured
  sparsity, product statistics and predicted bits of a Keras model, as a
  :class:`PrecisionPlan` that records the retention it predicts per GEMM.
* :class:`GemmProbe`: a layer's GEMMs with the real kernels, emulated against exact, on
  real operands: the direct measurement ``predict`` falls back on and the training
  driver's health probe uses.
* :func:`fused_vrr` / :func:`fused_vrr_monte_carlo`: the same for a tensor core's fused
  multi-term adder chain (numerics.md §7; docs/vrr.md §14), e.g. ``"hopper:e4m3"``, with
  promotion; :func:`longest_promotion_interval`: the longest promotion interval that
  passes the criterion; :func:`predict_tensor_core`: that for every GEMM of a network
  (``python -m tfaccum.analyze --tensor_core=hopper:e4m3``), :func:`plot_promotion` its
  retention against the promotion interval.
* :func:`plot_vrr`: VRR against n, analytical curves and Monte Carlo points (matplotlib).

(``analysis.vrr`` and ``analysis.predict`` are the functions; their modules are
``tfaccum.analysis.vrr`` and ``tfaccum.analysis.predict`` in ``sys.modules``.)
"""

from tfaccum.analysis.fused import (FusedSetup, PromotionSearch, fused_setup, fused_variance_lost,
                                    fused_vrr, fused_vrr_monte_carlo,
                                    longest_promotion_interval)
from tfaccum.analysis.measure import GemmErrors, GemmProbe
from tfaccum.analysis.plan import GEMMS, GemmPrediction, LayerPrediction, PrecisionPlan
from tfaccum.analysis.predict import (GemmStatistics, Statistics, measure_sparsity,
                                      measure_statistics, predict)
from tfaccum.analysis.tensor_core import (TensorCoreGemm, TensorCoreLayer, TensorCorePlan,
                                          plot_promotion, predict_tensor_core)
from tfaccum.analysis.vrr import (
    CRITERIA,
    DEFAULT_MAX_RELATIVE_LOSS,
    MONTE_CARLO_EXPONENT_BITS,
    ROUNDINGS,
    VRREstimate,
    criterion_description,
    empirical_vrr,
    min_mantissa_bits,
    operand_noise,
    passes_criterion,
    plot_vrr,
    product_variance,
    v_criterion,
    variance_lost,
    vrr,
    vrr_monte_carlo,
)
from tfaccum.inventory import gemm_layers, layer_lengths  # which GEMMs a model has, how long

__all__ = [
    "CRITERIA",
    "DEFAULT_MAX_RELATIVE_LOSS",
    "FusedSetup",
    "GEMMS",
    "GemmErrors",
    "GemmProbe",
    "GemmStatistics",
    "ROUNDINGS",
    "Statistics",
    "TensorCoreGemm",
    "TensorCoreLayer",
    "TensorCorePlan",
    "criterion_description",
    "fused_setup",
    "fused_variance_lost",
    "fused_vrr",
    "fused_vrr_monte_carlo",
    "longest_promotion_interval",
    "measure_statistics",
    "operand_noise",
    "GemmPrediction",
    "LayerPrediction",
    "MONTE_CARLO_EXPONENT_BITS",
    "PrecisionPlan",
    "PromotionSearch",
    "VRREstimate",
    "empirical_vrr",
    "gemm_layers",
    "layer_lengths",
    "measure_sparsity",
    "min_mantissa_bits",
    "passes_criterion",
    "plot_promotion",
    "plot_vrr",
    "predict",
    "predict_tensor_core",
    "product_variance",
    "v_criterion",
    "variance_lost",
    "vrr",
    "vrr_monte_carlo",
]
