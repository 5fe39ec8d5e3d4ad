"""``tfaccum.rewrite``: a copy of a Sequential or Functional Keras model whose ``Dense`` and
``Conv2D`` layers are tfaccum layers.

One call turns the ``Dense`` and ``Conv2D`` layers of a model into their tfaccum twins
(same names, configuration and weights)::

    >>> import keras, tfaccum
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, name="hidden"),
    ...                           keras.layers.Dense(10, name="predictions")])
    >>> policy = tfaccum.AccumPolicy(fwd=tfaccum.AccumConfig("e6m9", chunk_size=8))
    >>> emulated = tfaccum.rewrite(model, policy, exclude=["predictions"])
    >>> [type(layer).__name__ for layer in emulated.layers]
    ['AccumDense', 'Dense']

A subclassed model cannot be rewritten (Keras cannot clone it); build it inside
``tfaccum.accumulation_scope(policy)`` instead (:mod:`tfaccum.scope`).

Selecting layers (``layers=`` and ``exclude=`` of :func:`rewrite`):

* a ``str`` or compiled ``re.Pattern``: a regular expression that must match the *whole*
  name (``re.fullmatch``) of the layer or of a nested model containing it;
* a list/tuple/set of ``str``: exact names of layers or of nested models (a nested model's
  name stands for every layer inside it); a name that matches nothing is a ``ValueError``.
  Compiled patterns may be mixed in;
* a callable ``f(layer) -> bool``, called on each ``Dense``/``Conv2D``.

Only the exact Keras classes of ``tfaccum.layers.TWINS`` (``Dense``, ``Conv1D``,
``Conv2D``, ``DepthwiseConv1D/2D``, ``SeparableConv1D/2D``, ``Conv1DTranspose/2DTranspose``,
``EinsumDense``, ``MultiHeadAttention``, ``GroupQueryAttention``; not subclasses of them),
and tfaccum layers (whose policy is then replaced), are rewritten. Other layers that
compute GEMMs (``Conv3D``, recurrent layers,
wrappers such as ``TimeDistributed(Dense)``, subclasses of ``Dense``/``Conv2D``) keep
ordinary float32 GEMMs: :func:`rewrite` lists them in a :class:`NotEmulatedWarning`
and in ``new_model.tfaccum_report``, and :func:`tfaccum.summary` lists them under its
table.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import keras

from tfaccum.config import AccumConfig, AccumPolicy
from tfaccum.inventory import gemm_classes, not_emulated_reason, twin_class, walk
from tfaccum.scope import coerce_policy

__all__ = ["rewrite", "RewriteReport", "NotEmulatedWarning"]


class NotEmulatedWarning(UserWarning):
    """Some layers of a rewritten model compute GEMMs that tfaccum does not emulate."""


@dataclasses.dataclass(frozen=True)
class RewriteReport:
    """What :func:`rewrite` did.

    Attributes:
      replaced: name -> AccumPolicy of every layer now computed by tfaccum.
      kept: names of the ``Dense``/``Conv2D`` layers left as they were (not selected).
      not_emulated: ``(name, reason)`` of layers whose GEMMs stay ordinary float32
        because tfaccum has no twin for them.
    """

    replaced: Dict[str, AccumPolicy]
    kept: Tuple[str, ...]
    not_emulated: Tuple[Tuple[str, str], ...]


def _functional_class():
    try:
        from keras.src.models.functional import Functional
    except ImportError:  # pragma: no cover - layout of other Keras versions
        return ()
    return Functional


def _is_graph_model(model) -> bool:
    return isinstance(model, (keras.Sequential, _functional_class()))


def _subclassed_error(model) -> TypeError:
    return TypeError(
        f"tfaccum.rewrite cannot rewrite the subclassed model {model.name!r} "
        f"({type(model).__name__}): Keras can clone only Sequential and Functional models. "
        "Build the model inside `with tfaccum.accumulation_scope(policy):` instead; every "
        "keras.layers.Dense and Conv2D created there is a tfaccum layer.")


class _Selector:
    """One ``layers=``/``exclude=`` argument, compiled."""

    def __init__(self, spec, argname: str, known_names: set):
        self.spec, self.argname = spec, argname
        self.names: set = set()
        self.patterns: list = []
        self.func: Optional[Callable] = None
        if isinstance(spec, (str, re.Pattern)):
            self.patterns.append(re.compile(spec) if isinstance(spec, str) else spec)
        elif callable(spec):
            self.func = spec
        elif isinstance(spec, (list, tuple, set, frozenset)):
            for item in spec:
                if isinstance(item, re.Pattern):
                    self.patterns.append(item)
                elif isinstance(item, str):
                    self.names.add(item)
                else:
                    raise TypeError(f"{argname}= items must be layer names (str) or compiled "
                                    f"regular expressions, got {type(item).__name__}")
        else:
            raise TypeError(
                f"{argname}= must be a regular expression (str or re.Pattern), a list of "
                f"layer names or a callable(layer) -> bool, got {type(spec).__name__}")
        unknown = sorted(self.names - known_names)
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, known_names, n=3)
                hints.append(f"{name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)"
                                            if close else ""))
            raise ValueError(f"{argname}= names no layer of the model: {', '.join(hints)}")
        for pattern in self.patterns:
            if not any(pattern.fullmatch(n) for n in known_names):
                warnings.warn(f"{argname}= regular expression {pattern.pattern!r} matches "
                              "no layer name (it must match the whole name)", stacklevel=4)

    def __call__(self, layer, ancestors) -> bool:
        if self.func is not None:
            return bool(self.func(layer))
        names = [layer.name] + [a.name for a in ancestors]
        return (any(n in self.names for n in names)
                or any(p.fullmatch(n) for p in self.patterns for n in names))


def _resolve_policies(policy_or_plan) -> Tuple[Optional[AccumPolicy], Optional[dict]]:
    """(uniform policy, None) or (None, {name: AccumPolicy})."""
    if isinstance(policy_or_plan, (AccumPolicy, AccumConfig)):
        return coerce_policy(policy_or_plan), None
    mapping = policy_or_plan
    if not isinstance(mapping, Mapping) and callable(getattr(mapping, "policies", None)):
        mapping = mapping.policies()
    if isinstance(mapping, Mapping):
        resolved = {}
        for name, value in mapping.items():
            if not isinstance(name, str):
                raise TypeError(f"policy mapping keys must be layer names (str), got "
                                f"{type(name).__name__} {name!r}")
            if not isinstance(value, (AccumPolicy, AccumConfig, Mapping)):
                raise TypeError(f"the policy for layer {name!r} must be a tfaccum.AccumPolicy "
                                f"or AccumConfig, got {type(value).__name__}")
            resolved[name] = coerce_policy(value, what=f"the policy for layer {name!r}")
        return None, resolved
    raise TypeError(
        "policy_or_plan must be a tfaccum.AccumPolicy, a tfaccum.AccumConfig, a mapping "
        "from layer name to policy, or a precision plan with a .policies() method; got "
        f"{type(policy_or_plan).__name__}")


def _clone_plain(layer):
    try:
        return layer.__class__.from_config(layer.get_config())
    except Exception as err:  # noqa: BLE001 - re-raised with the layer named
        raise TypeError(f"tfaccum.rewrite could not clone layer {layer.name!r} "
                        f"({type(layer).__name__}) from its config: {err}") from err


def _copy_weights(old, new):
    if not old.weights:
        return
    if not new.built and old.built:
        build_config = old.get_build_config()
        if build_config:
            new.build_from_config(build_config)
    try:
        new.set_weights(old.get_weights())
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(f"tfaccum.rewrite could not copy the weights of layer "
                           f"{old.name!r} ({type(old).__name__}): {err}") from err


def _input_like(tensor):
    layer = tensor._keras_history.operation
    return keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype, name=layer.name,
                       sparse=getattr(layer, "sparse", False),
                       ragged=getattr(layer, "ragged", False),
                       optional=getattr(layer, "optional", False))


def rewrite(model, policy_or_plan, *, layers=None, exclude=None):
    """A copy of ``model`` whose selected ``Dense``/``Conv2D`` layers are tfaccum layers.

    Args:
      model: a Sequential or Functional ``keras.Model`` (nested Sequential/Functional
        models, shared layers, skip connections and any other layers are fine). It is
        not modified; every layer of the result is a new layer holding a copy of the
        original's weights. A subclassed model raises ``TypeError``: use
        :func:`accumulation_scope`.
      policy_or_plan: an ``AccumPolicy`` (or an ``AccumConfig``, used for all three
        GEMMs) for every selected layer; or a mapping from layer name (or nested model
        name) to policy, in which case only the layers it names are rewritten; or a
        precision plan, any object whose ``.policies()`` returns such a mapping.
      layers: which layers to consider (default: all); see the module docstring.
      exclude: which of them to leave as they are; same forms as ``layers``.

    Returns:
      The new model (same class of model, names and weights; not compiled unless Keras'
      ``clone_model`` compiles it, which it does for a compiled Sequential model).
      ``new_model.tfaccum_report`` is a :class:`RewriteReport`.

    Raises:
      TypeError: wrong ``policy_or_plan`` or selector type, subclassed model.
      ValueError: a name in ``layers``/``exclude``/the mapping that names no layer, or a
        name in ``layers``/the mapping that names a layer tfaccum cannot emulate.

    Warns:
      NotEmulatedWarning: the model has GEMM layers that stay float32 (listed by name).
    """
    return _rewrite(model, policy_or_plan, layers, exclude, stacklevel=3)


def _rewrite(model, policy_or_plan, layers, exclude, stacklevel):
    if not isinstance(model, keras.Model):
        raise TypeError(f"tfaccum.rewrite expects a keras.Model, got {type(model).__name__}")
    uniform, mapping = _resolve_policies(policy_or_plan)
    if not _is_graph_model(model):
        raise _subclassed_error(model)

    entries = walk(model)
    layer_names = {layer.name for layer, _ in entries}
    model_names = {layer.name for layer, _ in entries if isinstance(layer, keras.Model)}
    known = layer_names | {model.name}

    include = None if layers is None else _Selector(layers, "layers", known)
    excl = None if exclude is None else _Selector(exclude, "exclude", known)

    by_name = {}
    for layer, _ in entries:
        by_name.setdefault(layer.name, layer)

    def check_explicit(names, argname):
        for name in names:
            layer = by_name.get(name)
            if layer is None or name in model_names or name == model.name:
                continue
            if twin_class(layer) is None:
                raise ValueError(
                    f"{argname} names layer {name!r}, a {type(layer).__name__}: tfaccum "
                    "emulates only the Keras layers of tfaccum.layers.TWINS (Dense and the "
                    "1-D/2-D, depthwise, separable and transposed convolutions, EinsumDense and "
                    "attention)")

    if include is not None:
        check_explicit(include.names, "layers=")
    if mapping is not None:
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError("the policy mapping names no layer of the model: "
                             + ", ".join(map(repr, unknown)))
        check_explicit(mapping, "the policy mapping")

    def policy_for(layer, ancestors) -> Optional[AccumPolicy]:
        if uniform is not None:
            return uniform
        for name in [layer.name] + [a.name for a in reversed(ancestors)] + [model.name]:
            if name in mapping:
                return mapping[name]
        return None

    classes = gemm_classes()
    selected: Dict[int, Tuple[type, AccumPolicy]] = {}
    kept: List[str] = []
    not_emulated: List[Tuple[str, str]] = []
    for layer, ancestors in entries:
        twin = twin_class(layer)
        if twin is None:
            reason = not_emulated_reason(layer, classes)
            if reason is not None:
                not_emulated.append((layer.name, reason))
            continue
        policy = policy_for(layer, ancestors)
        chosen = (policy is not None
                  and (include is None or include(layer, ancestors))
                  and not (excl is not None and excl(layer, ancestors)))
        if not chosen:
            kept.append(layer.name)
            continue
        inside = [a for a in ancestors if not _is_graph_model(a)]
        if inside:
            raise TypeError(
                f"layer {layer.name!r} is inside the subclassed model {inside[0].name!r}, "
                "which tfaccum.rewrite cannot clone: exclude it (exclude=["
                f"{inside[0].name!r}]) or build it inside tfaccum.accumulation_scope(policy)")
        selected[id(layer)] = (twin, policy)

    pairs = []

    def clone_function(layer):
        choice = selected.get(id(layer))
        if choice is not None:
            twin, policy = choice
            config = layer.get_config()
            config["policy"] = policy.to_dict()
            new = twin.from_config(config)
        else:
            new = _clone_plain(layer)
        pairs.append((layer, new))
        return new

    input_tensors = None
    if not isinstance(model, keras.Sequential):
        # Keep the input names (clone_model would name the inputs after their tensors).
        input_tensors = keras.tree.map_structure(_input_like, model.input)
    new_model = keras.models.clone_model(model, input_tensors=input_tensors,
                                         clone_function=clone_function, recursive=True)
    for old, new in pairs:
        _copy_weights(old, new)
    if new_model.trainable != model.trainable:
        new_model.trainable = model.trainable

    report = RewriteReport(
        replaced={layer.name: selected[id(layer)][1] for layer, _ in entries
                  if id(layer) in selected},
        kept=tuple(kept),
        not_emulated=tuple(not_emulated),
    )
    new_model.tfaccum_report = report
    if not_emulated:
        listing = ", ".join(f"{name!r} ({reason})" for name, reason in not_emulated)
        warnings.warn(f"tfaccum.rewrite: {len(not_emulated)} layer(s) of model "
                      f"{model.name!r} compute GEMMs that tfaccum does not emulate and stay "
                      f"float32: {listing}", NotEmulatedWarning, stacklevel=stacklevel)
    if not selected:
        warnings.warn(f"tfaccum.rewrite: no layer of model {model.name!r} was selected; the "
                      "result is a plain copy", UserWarning, stacklevel=stacklevel)
    return new_model
