"""tfaccum: train TensorFlow/Keras models as if matrix units accumulated in narrow floats.

Quickstart::

    >>> import tensorflow as tf, tfaccum
    >>> acc = tfaccum.FloatFormat(6, 9)                  # 6 exponent bits, 9 mantissa bits
    >>> cfg = tfaccum.AccumConfig(accumulator=acc, chunk_size=64)
    >>> a, b = tf.ones([2, 3000]), tf.ones([3000, 4])
    >>> y = tfaccum.accum_matmul(a, b, cfg)              # every partial sum rounded to e6m9
    >>> y.shape, float(y[0, 0])
    (TensorShape([2, 4]), 3000.0)

See ``docs/numerics.md`` for exactly what is computed.
"""

from tfaccum.config import (  # noqa: F401
    BFLOAT16,
    BINARY16,
    BINARY32,
    FLOAT32,
    FLOAT32_CONFIG,
    FLOAT32_POLICY,
    FP8_E4M3,
    FP8_E4M3FN,
    FP8_E5M2,
    FULL_PRECISION,
    PRESETS,
    AccumConfig,
    AccumPolicy,
    FloatFormat,
    FusedAdder,
    as_format,
    as_policy,
)
from tfaccum.ops import (accum_conv2d, accum_conv2d_transpose, accum_einsum,  # noqa: F401
                         accum_matmul, quantize)

from tfaccum import layers  # noqa: E402,F401  (registers the layers with Keras, for loading)
from tfaccum import presets  # noqa: E402,F401
from tfaccum.layers import set_step_counter  # noqa: E402,F401
from tfaccum.model_rewrite import rewrite  # noqa: E402,F401
from tfaccum.model_summary import summary  # noqa: E402,F401
from tfaccum.scope import accumulation_scope  # noqa: E402,F401

__version__ = "0.1.0"

# Submodules that need more than TensorFlow and Keras load on first use.
_LAZY = {
    "reference": ("tfaccum.reference", None),
    "analysis": ("tfaccum.analysis", None),
    "models": ("tfaccum.models", None),
    "rewriting": ("tfaccum.rewriting", None),  # the old module of rewrite/summary, an alias
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tfaccum' has no attribute {name!r}")
