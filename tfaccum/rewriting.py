"""Emulate a whole Keras model: ``rewrite``, ``accumulation_scope`` and ``summary``.

One call turns the ``Dense`` and ``Conv2D`` layers of a Sequential or Functional model
into their tfaccum twins (same names, configuration and weights)::

    >>> model = keras.applications.ResNet50(weights=None, classes=10)
    >>> policy = tfaccum.AccumPolicy(fwd=cfg_fwd, bwd=cfg_bwd, grad=cfg_grad)
    >>> emulated = tfaccum.rewrite(model, policy, exclude=["predictions"])
    >>> tfaccum.summary(emulated, batch_size=256)

A subclassed model cannot be rewritten (Keras cannot clone it); build it inside
``tfaccum.accumulation_scope(policy)`` instead, where every ``keras.layers.Dense`` and
``keras.layers.Conv2D`` constructed is a tfaccum layer::

    >>> with tfaccum.accumulation_scope(policy):
    ...     model = MySubclassedModel()

Selecting layers (``layers=`` and ``exclude=`` of :func:`rewrite`):

* a ``str`` or compiled ``re.Pattern``: a regular expression that must match the *whole*
  name (``re.fullmatch``) of the layer or of a nested model containing it;
* a list/tuple/set of ``str``: exact names of layers or of nested models (a nested model's
  name stands for every layer inside it); a name that matches nothing is a ``ValueError``.
  Compiled patterns may be mixed in;
* a callable ``f(layer) -> bool``, called on each ``Dense``/``Conv2D``.

Only ``keras.layers.Dense`` and ``keras.layers.Conv2D`` themselves (not subclasses of
them), and tfaccum layers (whose policy is then replaced), are rewritten. Other layers
that compute GEMMs (``Conv1D``, ``DepthwiseConv2D``, ``SeparableConv2D``,
``Conv2DTranspose``, ``EinsumDense``, ``MultiHeadAttention``, recurrent layers,
wrappers such as ``TimeDistributed(Dense)``, subclasses of ``Dense``/``Conv2D``) keep
ordinary float32 GEMMs: :func:`rewrite` lists them in a :class:`NotEmulatedWarning`
and in ``new_model.tfaccum_report``, and :func:`summary` lists them under its table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import threading
import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import keras

from tfaccum.config import AccumConfig, AccumPolicy
from tfaccum.layers import TWINS, AccumConv2D, AccumDense, coerce_policy

__all__ = [
    "rewrite",
    "accumulation_scope",
    "current_scope_policy",
    "summary",
    "gemm_lengths",
    "GemmLengths",
    "RewriteReport",
    "NotEmulatedWarning",
]

EMULATED = (AccumDense, AccumConv2D)


class NotEmulatedWarning(UserWarning):
    """Some layers of a rewritten model compute GEMMs that tfaccum does not emulate."""


def _gemm_classes() -> tuple:
    """Keras layer classes that compute weight GEMMs (or contain layers that do)."""
    names = ["Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose",
             "Conv2DTranspose", "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D",
             "SeparableConv1D", "SeparableConv2D", "SimpleRNN", "LSTM", "GRU",
             "SimpleRNNCell", "LSTMCell", "GRUCell", "ConvLSTM1D", "ConvLSTM2D",
             "ConvLSTM3D", "MultiHeadAttention", "GroupedQueryAttention"]
    return tuple(getattr(keras.layers, n) for n in names if hasattr(keras.layers, n))


# --------------------------------------------------------------------------------------
# accumulation_scope
# --------------------------------------------------------------------------------------

_local = threading.local()
_hook_lock = threading.Lock()
_hook_users = 0
_saved_new: Dict[type, Any] = {}


def _scope_stack() -> list:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def current_scope_policy() -> Optional[AccumPolicy]:
    """The policy of the innermost active ``accumulation_scope`` of this thread, or None."""
    stack = _scope_stack()
    return stack[-1] if stack else None


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
            for base, twin in TWINS.items():
                _saved_new[base] = base.__dict__.get("__new__")  # None: inherited
                base.__new__ = _make_new_hook(base, twin, base.__new__)
        _hook_users += 1


def _remove_hooks():
    global _hook_users
    with _hook_lock:
        _hook_users -= 1
        if _hook_users == 0:
            for base in TWINS:
                saved = _saved_new.pop(base)
                if saved is None:
                    del base.__new__
                else:
                    base.__new__ = saved


@contextlib.contextmanager
def accumulation_scope(policy: Union[AccumPolicy, AccumConfig]):
    """Inside this context every ``keras.layers.Dense``/``Conv2D`` constructed is a tfaccum
    layer (``AccumDense``/``AccumConv2D``) with ``policy``.

    This is the way to emulate a subclassed model, which :func:`rewrite` cannot clone::

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


# --------------------------------------------------------------------------------------
# rewrite
# --------------------------------------------------------------------------------------

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


def _twin_class(layer) -> Optional[type]:
    """The tfaccum class a layer becomes, or None if it cannot be emulated."""
    if isinstance(layer, EMULATED):
        return type(layer)
    twin = TWINS.get(type(layer))
    if twin is not None and layer.quantization_mode is None:
        return twin
    return None


def _not_emulated_reason(layer, gemm_classes) -> Optional[str]:
    if isinstance(layer, keras.Model) or _twin_class(layer) is not None:
        return None
    if isinstance(layer, gemm_classes):
        if type(layer) in TWINS:
            return (f"{type(layer).__name__} with Keras quantization "
                    f"{layer.quantization_mode!r}")
        if isinstance(layer, tuple(TWINS)):
            return f"{type(layer).__name__} (a subclass of {type(layer).__mro__[1].__name__})"
        return type(layer).__name__
    inner = [sub for sub in layer._flatten_layers(include_self=False, recursive=True)
             if isinstance(sub, gemm_classes) and not isinstance(sub, EMULATED)]
    if inner:
        kinds = ", ".join(sorted({type(sub).__name__ for sub in inner}))
        return f"{type(layer).__name__} containing {kinds}"
    return None


def _walk(model, ancestors=()) -> Iterable[Tuple[Any, tuple]]:
    """Every layer of a model with the tuple of models enclosing it (outermost first)."""
    for layer in model.layers:
        yield layer, ancestors
        if isinstance(layer, keras.Model):
            yield from _walk(layer, ancestors + (layer,))


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

    entries: List[Tuple[Any, tuple]] = []
    seen = set()
    for layer, ancestors in _walk(model):
        if id(layer) not in seen:
            seen.add(id(layer))
            entries.append((layer, ancestors))
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
            if _twin_class(layer) is None:
                raise ValueError(
                    f"{argname} names layer {name!r}, a {type(layer).__name__}: tfaccum "
                    "emulates only keras.layers.Dense and keras.layers.Conv2D layers")

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

    gemm_classes = _gemm_classes()
    selected: Dict[int, Tuple[type, AccumPolicy]] = {}
    kept: List[str] = []
    not_emulated: List[Tuple[str, str]] = []
    for layer, ancestors in entries:
        twin = _twin_class(layer)
        if twin is None:
            reason = _not_emulated_reason(layer, gemm_classes)
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


# --------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GemmLengths:
    """The accumulation lengths of one emulated layer call (numerics.md section 5).

    ``grad`` is None when the batch size is unknown; ``grad_per_example`` is then the
    factor it multiplies (``OH*OW`` for a conv, the product of the extra leading
    dimensions for a Dense). Lengths that depend on an unknown dimension are None.
    """

    layer: str
    kind: str
    input_shape: tuple
    fwd: Optional[int]
    bwd: Optional[int]
    grad: Optional[int]
    grad_per_example: Optional[int]
    policy: AccumPolicy


def _input_shapes(layer) -> List[tuple]:
    shapes = []
    for node in getattr(layer, "_inbound_nodes", []):
        tensors = node.input_tensors
        if tensors:
            shape = tuple(tensors[0].shape)
            if shape not in shapes:
                shapes.append(shape)
    if not shapes and layer.built:
        build_config = layer.get_build_config() or {}
        if "input_shape" in build_config:
            shapes.append(tuple(build_config["input_shape"]))
    return shapes


def _prod(values) -> Optional[int]:
    out = 1
    for v in values:
        if v is None:
            return None
        out *= int(v)
    return out


def _lengths(layer, shape, batch_size) -> GemmLengths:
    batch = batch_size if batch_size is not None else shape[0]
    if isinstance(layer, AccumConv2D):
        kh, kw = layer.kernel_size
        channel_axis = -1 if layer.data_format == "channels_last" else 1
        cin = shape[channel_axis]
        out = layer.compute_output_shape(shape)
        oh, ow = (out[1], out[2]) if layer.data_format == "channels_last" else (out[2], out[3])
        fwd = None if cin is None else kh * kw * cin // layer.groups
        bwd = kh * kw * layer.filters // layer.groups
        per_example = _prod([oh, ow])
    else:
        fwd = shape[-1]
        bwd = layer.units
        per_example = _prod(shape[1:-1])
    grad = None if batch is None or per_example is None else int(batch) * per_example
    return GemmLengths(layer.name, type(layer).__name__, shape, fwd, bwd, grad, per_example,
                       layer.policy)


def _all_layers(model) -> list:
    return list(model._flatten_layers(include_self=False, recursive=True))


def _walk_any(model) -> list:
    """Layers of any model, descending into nested models but not into other layers."""
    out, seen = [], set()

    def visit(m):
        for layer in m._flatten_layers(include_self=False, recursive=False):
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            out.append(layer)
            if isinstance(layer, keras.Model):
                visit(layer)

    visit(model)
    return out


def gemm_lengths(model, batch_size: Optional[int] = None) -> List[GemmLengths]:
    """One :class:`GemmLengths` per emulated layer and distinct input shape it is called
    on, in the model's layer order. ``batch_size`` overrides the batch dimension."""
    rows = []
    for layer in _all_layers(model):
        if isinstance(layer, EMULATED):
            shapes = _input_shapes(layer)
            if not shapes:
                rows.append(GemmLengths(layer.name, type(layer).__name__, (), None, None, None,
                                        None, layer.policy))
            for shape in shapes:
                rows.append(_lengths(layer, shape, batch_size))
    return rows


def _fmt_len(value, per_example=None) -> str:
    if value is not None:
        return str(value)
    if per_example is not None:
        return f"B*{per_example}"
    return "?"


def _fmt_shape(shape) -> str:
    if not shape:
        return "(not built)"
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def _fmt_config(config: AccumConfig) -> str:
    text = repr(config)
    return text[len("AccumConfig("):-1] if text.startswith("AccumConfig(") else text


def summary(model, batch_size: Optional[int] = None, *, print_fn=print) -> str:
    """A table of the emulated GEMMs of ``model``: per tfaccum layer, the accumulation
    length of its FWD, BWD and GRAD GEMMs (numerics.md section 5) for the layer's actual
    input shape and ``batch_size`` (default: the model's static batch size, else GRAD is
    shown as ``B*n``), and the AccumConfig of each; then the GEMM layers left float32.

    Works on any model (rewritten, built in an ``accumulation_scope``, or subclassed once
    built). Prints the table with ``print_fn`` (None: do not print) and returns it.
    See :func:`gemm_lengths` for the numbers as data.
    """
    rows = gemm_lengths(model, batch_size)
    header = ("Layer (type)", "Input shape", "GEMM", "Length", "Accumulation")
    table = []
    for row in rows:
        label = f"{row.layer} ({row.kind})"
        shape = _fmt_shape(row.input_shape)
        gemms = (("FWD", row.fwd, None, row.policy.fwd), ("BWD", row.bwd, None, row.policy.bwd),
                 ("GRAD", row.grad, row.grad_per_example, row.policy.grad))
        for i, (gemm, length, per_example, config) in enumerate(gemms):
            table.append((label if i == 0 else "", shape if i == 0 else "", gemm,
                          _fmt_len(length, per_example), _fmt_config(config)))
        if row.policy.operands is not None:
            table.append(("", "", "", "", f"operands rounded to {row.policy.operands!r}"))
    widths = [max([len(header[c])] + [len(r[c]) for r in table]) for c in range(len(header))]

    def line(cells):
        return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()

    rule = "-" * max([len(line(header))] + [len(line(r)) for r in table])
    batch_text = f"batch size {batch_size}" if batch_size is not None else "model batch size"
    out = [f'tfaccum summary of model "{model.name}" ({batch_text})', rule, line(header), rule]
    previous = None
    for r in table:
        if r[0] and previous is not None:
            out.append("")
        out.append(line(r))
        previous = r
    out.append(rule)
    emulated_layers = {row.layer for row in rows}
    out.append(f"Emulated layers: {len(emulated_layers)}")
    gemm_classes = _gemm_classes()
    others = []
    for layer in _walk_any(model):
        reason = _not_emulated_reason(layer, gemm_classes)
        if reason is not None:
            others.append(f"{layer.name} ({reason})")
        elif type(layer) in TWINS:
            others.append(f"{layer.name} ({type(layer).__name__}, not rewritten)")
    if others:
        out.append(f"Float32 GEMM layers (not emulated): {len(others)}")
        out.extend(f"  {item}" for item in others)
    text = "\n".join(out)
    if print_fn is not None:
        print_fn(text)
    return text
