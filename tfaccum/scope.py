"""``accumulation_scope``: the policy stack, and the hook that makes ``keras.layers.Dense``
and ``keras.layers.Conv2D`` construct tfaccum layers inside a scope.

This module sits below :mod:`tfaccum.layers` (docs/architecture.md): the layers ask it
for the policy of the innermost scope (:func:`coerce_policy` of ``None``), and register
with it the Keras class each of them stands in for (:func:`register_twin`), which the
hook redirects. It imports nothing of tfaccum but the configuration objects.

A subclassed model cannot be rewritten (Keras cannot clone it); build it inside
``tfaccum.accumulation_scope(policy)`` instead, where every ``keras.layers.Dense`` and
``keras.layers.Conv2D`` constructed is a tfaccum layer::

    >>> import keras, tfaccum
    >>> policy = tfaccum.AccumPolicy(fwd=tfaccum.AccumConfig("e6m9", chunk_size=64))
    >>> with tfaccum.accumulation_scope(policy):
    ...     layer = keras.layers.Dense(10)
    >>> type(layer).__name__, layer.policy == policy
    ('AccumDense', True)
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Dict, Mapping, Optional, Union

from tfaccum.config import FLOAT32_POLICY, AccumConfig, AccumPolicy, as_policy

__all__ = ["accumulation_scope", "current_scope_policy", "coerce_policy", "register_twin",
           "PolicyLike"]

PolicyLike = Union[AccumPolicy, AccumConfig, Mapping[str, Any]]

_local = threading.local()
_hook_lock = threading.Lock()
_hook_users = 0
_saved_new: Dict[type, Any] = {}
# The exact Keras class -> the tfaccum class constructed instead inside a scope; filled
# by tfaccum.layers when it defines them (this module may not import it).
_twins: Dict[type, type] = {}


def register_twin(base: type, twin: type) -> None:
    """Inside a scope, constructing exactly ``base`` constructs ``twin`` instead."""
    with _hook_lock:
        if _hook_users:
            raise RuntimeError("cannot register a tfaccum twin while an accumulation_scope "
                               "is active")
        _twins[base] = twin


def _scope_stack() -> list:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def current_scope_policy() -> Optional[AccumPolicy]:
    """The policy of the innermost active ``accumulation_scope`` of this thread, or None."""
    stack = _scope_stack()
    return stack[-1] if stack else None


def coerce_policy(value: Optional[PolicyLike], *, what: str = "policy") -> AccumPolicy:
    """An AccumPolicy from an AccumPolicy, an AccumConfig (all three GEMMs) or a dict.

    ``None`` gives the policy of the innermost active ``tfaccum.accumulation_scope``, or
    the full-precision policy outside any scope.
    """
    if value is None:
        scoped = current_scope_policy()
        return FLOAT32_POLICY if scoped is None else scoped
    if isinstance(value, Mapping):
        return AccumPolicy.from_dict(value)
    if isinstance(value, (AccumPolicy, AccumConfig)):
        return as_policy(value)
    raise TypeError(f"{what} must be a tfaccum.AccumPolicy, a tfaccum.AccumConfig or a dict "
                    f"from AccumPolicy.to_dict(), got {type(value).__name__}")


def _make_new_hook(base: type, twin: type, inherited_new):
    def __new__(cls, *args, **kwargs):
        # Only the exact Keras class is redirected: user subclasses of Dense/Conv2D keep
        # their own behaviour. Python then runs twin.__init__ on the returned instance.
        if cls is base and current_scope_policy() is not None:
            obj = inherited_new(twin, *args, **kwargs)
            # Tell the twin's __init__ to take the name the Keras class would get.
            vars(obj)["_tfaccum_keras_name"] = base.__name__
            return obj
        return inherited_new(cls, *args, **kwargs)

    __new__.__tfaccum_hook__ = True
    return staticmethod(__new__)


def _install_hooks():
    global _hook_users
    with _hook_lock:
        if _hook_users == 0:
            for base, twin in _twins.items():
                _saved_new[base] = base.__dict__.get("__new__")  # None: inherited
                base.__new__ = _make_new_hook(base, twin, base.__new__)
        _hook_users += 1


def _remove_hooks():
    global _hook_users
    with _hook_lock:
        _hook_users -= 1
        if _hook_users == 0:
            for base in list(_saved_new):
                saved = _saved_new.pop(base)
                if saved is None:
                    del base.__new__
                else:
                    base.__new__ = saved


@contextlib.contextmanager
def accumulation_scope(policy: Union[AccumPolicy, AccumConfig]):
    """Inside this context every ``keras.layers.Dense``/``Conv2D`` constructed is a tfaccum
    layer (``AccumDense``/``AccumConv2D``) with ``policy``; so is every other Keras class
    that has a twin in ``tfaccum.layers.TWINS`` (the 1-D, depthwise, separable and
    transposed convolutions, ``EinsumDense``, ``MultiHeadAttention``,
    ``GroupQueryAttention``).

    This is the way to emulate a subclassed model, which :func:`tfaccum.rewrite` cannot
    clone::

        with tfaccum.accumulation_scope(tfaccum.AccumPolicy(fwd=cfg)):
            model = MyModel()          # its Dense/Conv2D layers are tfaccum layers

    It works however the class is reached (``keras.layers.Dense``, ``from keras.layers
    import Dense`` done earlier, ``keras.src...``) because it redirects the construction
    of the exact classes ``keras.layers.Dense`` and ``keras.layers.Conv2D``; subclasses of
    them, layers constructed before the scope, and other GEMM layers are unaffected.
    Layers deserialized inside the scope (``keras.models.load_model``, ``from_config``)
    are converted too. Scopes nest (the innermost policy wins) and are per thread; the
    classes are restored when the last scope exits. The layers are named as Keras would
    name a ``Dense``/``Conv2D`` (``dense_3``, ...). Yields the policy.
    """
    if policy is None:
        raise TypeError("accumulation_scope needs a tfaccum.AccumPolicy or AccumConfig, "
                        "got None")
    policy = coerce_policy(policy)
    _install_hooks()
    stack = _scope_stack()
    stack.append(policy)
    try:
        yield policy
    finally:
        stack.pop()
        _remove_hooks()
