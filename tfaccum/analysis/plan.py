"""``PrecisionPlan``: the predicted accumulator precision of every GEMM of a model.

A plan holds, for each ``Dense``/``Conv2D`` layer and each of its three GEMMs (FWD, BWD,
GRAD; numerics.md section 5), the accumulation length, the effective length (non-zero
products), the sparsity and the predicted accumulator mantissa bits; and the settings it
was predicted under. It prints as a table, converts to per-layer policies for
:func:`tfaccum.rewrite`, shifts by whole bits, and round-trips through JSON::

    >>> import tfaccum
    >>> from tfaccum.analysis import PrecisionPlan
    >>> model = tfaccum.models.digits_cnn()
    >>> plan = tfaccum.analysis.predict(model, batch_size=64, chunk_size=16, sparsity=None)
    >>> print(plan)                                   # one row per layer
    Precision plan for digits_cnn: batch 64, products m_p=5, chunk 16, ...
    ...
    layer       |   n n_eff seq c16    VRR |   n n_eff seq c16    VRR |    n n_eff seq c16    VRR
    ...
    conv2       | 144   144   5   4 0.9980 | 288   288   6   4 0.9972 | 4096  4096   9   7 0.9996
    ...
    >>> plan.policies()["conv2"]                      # what tfaccum.rewrite(model, plan) sets
    AccumPolicy(fwd=AccumConfig(e6m4, exact products, chunk 16, nearest-even),
                bwd=AccumConfig(e6m4, exact products, chunk 16, nearest-even),
                grad=AccumConfig(e6m7, exact products, chunk 16, nearest-even))
    >>> emulated = tfaccum.rewrite(model, plan.shift(-1))   # one bit fewer everywhere
    >>> PrecisionPlan.from_json(plan.to_json()) == plan
    True

JSON shape (``to_dict``)::

    {"layers": [{"layer": "conv1", "kind": "Conv2D",
                 "fwd": {"length": 27, "effective_length": 27, "sparsity": 0.0,
                         "mantissa_bits": 5, "sequential_mantissa_bits": 5},
                 "bwd": {...}, "grad": {...}}, ...],
     "model": "resnet32", "batch_size": 128, "product_mantissa_bits": 5,
     "chunk_size": 64, "cutoff": 50.0, "exponent_bits": 6, "method": "analytical",
     "sparsity": "measured", "operands": null, "product": null,
     "rounding": "nearest_even", "offset": 0}

``mantissa_bits`` is the prediction for the plan's ``chunk_size``;
``sequential_mantissa_bits`` (present when ``chunk_size > 0``) the one for sequential
accumulation of the same GEMM.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Tuple

from tfaccum.analysis.vrr import DEFAULT_MAX_RELATIVE_LOSS
from tfaccum.config import (ROUNDING_MODES, AccumConfig, AccumPolicy, FloatFormat,
                            as_format)

__all__ = ["GemmPrediction", "LayerPrediction", "PrecisionPlan", "GEMMS"]

GEMMS = ("fwd", "bwd", "grad")
_MAX_BITS = 23


def _clamp_bits(bits: int) -> int:
    return min(_MAX_BITS, max(0, int(bits)))


def _need(d: Mapping, key: str, what: str):
    if not isinstance(d, Mapping):
        raise ValueError(f"{what} must be a JSON object, got {type(d).__name__}")
    if key not in d:
        raise ValueError(f"{what} lacks the key {key!r}")
    return d[key]


#: How a GEMM's bits were chosen: the analytical model of docs/vrr.md, or a direct
#: measurement with the real kernels on real batches (where the model's assumption of
#: i.i.d. zero-mean products is far off; see ``coherence``).
BASES = ("analytical", "measured")


@dataclasses.dataclass(frozen=True)
class GemmPrediction:
    """One GEMM: ``length`` products per output, ``effective_length`` of them non-zero
    (``sparsity = 1 - effective/length`` as measured or given), and the predicted
    accumulator ``mantissa_bits`` (``sequential_mantissa_bits``: without chunking).

    ``retention`` is the VRR predicted at ``mantissa_bits`` (what the health probe should
    measure), from the analytical model or, when ``basis == "measured"``, measured with
    the real kernels on the prediction's batches. ``product_mean``/``product_std`` are the
    mean and standard deviation of the non-zero products and ``coherence`` is
    ``E[y^2] / E[sum of p^2]`` over the outputs (1 for the model's i.i.d. zero-mean
    products; larger when products add up coherently, smaller when they cancel); all three
    None when no data was measured.
    """

    length: int
    effective_length: int
    sparsity: float
    mantissa_bits: int
    sequential_mantissa_bits: Optional[int] = None
    retention: Optional[float] = None
    basis: str = "analytical"
    coherence: Optional[float] = None
    product_mean: Optional[float] = None
    product_std: Optional[float] = None

    def __post_init__(self):
        for name in ("length", "effective_length", "mantissa_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"GemmPrediction.{name} must be an int >= 0, got {value!r}")
        if self.mantissa_bits > _MAX_BITS:
            raise ValueError(f"mantissa_bits must be <= {_MAX_BITS}, got {self.mantissa_bits}")
        seq = self.sequential_mantissa_bits
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)
                                or not 0 <= seq <= _MAX_BITS):
            raise ValueError(f"sequential_mantissa_bits must be None or 0..{_MAX_BITS}, "
                             f"got {seq!r}")
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0:
            raise ValueError(f"GemmPrediction.sparsity must be in [0, 1], got {s!r}")
        object.__setattr__(self, "sparsity", float(s))
        if self.basis not in BASES:
            raise ValueError(f"GemmPrediction.basis must be one of {BASES}, got {self.basis!r}")
        for name in ("retention", "coherence", "product_mean", "product_std"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"GemmPrediction.{name} must be a number or None, "
                                     f"got {value!r}")
                object.__setattr__(self, name, float(value))
        if self.retention is not None and self.retention > 1.0:
            raise ValueError(f"GemmPrediction.retention must be <= 1, got {self.retention}")

    def shift(self, bits: int, retention: Optional[float] = None) -> "GemmPrediction":
        """The GEMM with ``bits`` more mantissa bits; ``retention``: the prediction at the
        new width (None: unknown)."""
        seq = self.sequential_mantissa_bits
        return dataclasses.replace(
            self, mantissa_bits=_clamp_bits(self.mantissa_bits + bits),
            sequential_mantissa_bits=None if seq is None else _clamp_bits(seq + bits),
            retention=retention if bits else self.retention)

    def to_dict(self) -> dict:
        d = {"length": self.length, "effective_length": self.effective_length,
             "sparsity": self.sparsity, "mantissa_bits": self.mantissa_bits,
             "basis": self.basis}
        for name in ("sequential_mantissa_bits", "retention", "coherence", "product_mean",
                     "product_std"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], what: str = "GEMM entry") -> "GemmPrediction":
        return cls(length=_need(d, "length", what),
                   effective_length=_need(d, "effective_length", what),
                   sparsity=_need(d, "sparsity", what),
                   mantissa_bits=_need(d, "mantissa_bits", what),
                   sequential_mantissa_bits=d.get("sequential_mantissa_bits"),
                   retention=d.get("retention"), basis=d.get("basis", "analytical"),
                   coherence=d.get("coherence"), product_mean=d.get("product_mean"),
                   product_std=d.get("product_std"))


@dataclasses.dataclass(frozen=True)
class LayerPrediction:
    """The three GEMMs of one layer, or of one GEMM set of a layer that has several
    (``gemm_set`` names it: a separable convolution's ``depthwise``/``pointwise``, an
    attention layer's projections and ``attn/qk``/``attn/av``; see
    :func:`tfaccum.inventory.gemm_rows`). Such a layer has one policy, which takes the
    widest prediction of its sets (:meth:`PrecisionPlan.policies`)."""

    layer: str
    fwd: GemmPrediction
    bwd: GemmPrediction
    grad: GemmPrediction
    kind: str = ""
    gemm_set: str = ""

    @property
    def label(self) -> str:
        return f"{self.layer} ({self.gemm_set})" if self.gemm_set else self.layer

    def gemm(self, name: str) -> GemmPrediction:
        if name not in GEMMS:
            raise KeyError(f"GEMM must be one of {GEMMS}, got {name!r}")
        return getattr(self, name)

    def shift(self, bits: int, retention=lambda gemm, prediction: None) -> "LayerPrediction":
        """``retention(gemm, shifted prediction)``: the predicted retention at the new
        width."""
        shifted = {}
        for g in GEMMS:
            moved = self.gemm(g).shift(bits)
            shifted[g] = moved if not bits else dataclasses.replace(
                moved, retention=retention(g, moved))
        return dataclasses.replace(self, **shifted)

    def to_dict(self) -> dict:
        d = {"layer": self.layer}
        if self.kind:
            d["kind"] = self.kind
        if self.gemm_set:
            d["gemm_set"] = self.gemm_set
        d.update({g: getattr(self, g).to_dict() for g in GEMMS})
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerPrediction":
        name = _need(d, "layer", "a layer entry")
        if not isinstance(name, str):
            raise ValueError(f"layer names must be strings, got {name!r}")
        gemms = {g: GemmPrediction.from_dict(_need(d, g, f"layer {name!r}"),
                                             f"layer {name!r} {g}") for g in GEMMS}
        return cls(layer=name, kind=str(d.get("kind", "")), gemm_set=str(d.get("gemm_set", "")),
                   **gemms)


def effective_chunk(chunk_size: int, length: int, effective: int) -> int:
    """The chunk size in non-zero products: zeros keep their slots, so a chunk of ``c``
    products holds ``c * effective / length`` non-zero ones on average (0: sequential)."""
    if chunk_size == 0 or chunk_size >= length or effective <= 0:
        return 0
    return min(effective, max(1, int(round(chunk_size * effective / length))))


def _format_or_none(value) -> Optional[FloatFormat]:
    return None if value is None else as_format(value)


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
    """Predicted accumulator precision per layer and GEMM, with the prediction settings.

    Attributes:
      layers: one :class:`LayerPrediction` per ``Dense``/``Conv2D`` layer, model order.
      batch_size: the batch size the GRAD lengths are for.
      product_mantissa_bits: ``m_p`` assumed for the products.
      chunk_size: 0 (sequential) or the chunk size the bits are predicted for, and that
        :meth:`policies` configures.
      cutoff: the criterion ``v(n) < cutoff``.
      exponent_bits: accumulator exponent bits used by :meth:`policies` (6 in the paper).
      method: ``"analytical"`` or ``"monte_carlo"``.
      sparsity: how effective lengths were obtained (``"measured"``,
        ``"measured (synthetic inputs)"``, ``"none"``, ``"given 0.5"``, ``"given"``).
      operands: format each GEMM's inputs are rounded to (``AccumPolicy.operands``);
        None: not rounded.
      product: format products are rounded to (``AccumConfig.product``); None: exact.
      rounding: the accumulator rounding mode of the policies (and of the prediction).
      offset: total of the :meth:`shift` calls that made this plan (0 for a prediction).
      model: the model's name.
      criterion, max_relative_loss: the criterion the bits pass
        (:func:`tfaccum.analysis.passes_criterion`).
      statistics: where the product statistics came from and what was assumed, in words.
    """

    layers: Tuple[LayerPrediction, ...]
    batch_size: int
    product_mantissa_bits: int = 5
    chunk_size: int = 0
    cutoff: float = 50.0
    exponent_bits: int = 6
    method: str = "analytical"
    sparsity: str = "none"
    operands: Optional[FloatFormat] = None
    product: Optional[FloatFormat] = None
    rounding: str = "nearest_even"
    offset: int = 0
    model: str = ""
    criterion: str = "bounded"
    max_relative_loss: float = DEFAULT_MAX_RELATIVE_LOSS
    statistics: str = ""

    def __post_init__(self):
        layers = tuple(self.layers)
        for layer in layers:
            if not isinstance(layer, LayerPrediction):
                raise TypeError(f"PrecisionPlan.layers must hold LayerPrediction, got "
                                f"{type(layer).__name__}")
        names = [(layer.layer, layer.gemm_set) for layer in layers]  # a layer's GEMM sets
        duplicates = sorted({n.label for n, key in zip(layers, names)
                             if names.count(key) > 1})
        if duplicates:
            raise ValueError(f"duplicate layer names in the plan: {duplicates}")
        object.__setattr__(self, "layers", layers)
        for name in ("batch_size", "product_mantissa_bits", "chunk_size", "exponent_bits",
                     "offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"PrecisionPlan.{name} must be an int, got {value!r}")
        if self.batch_size < 1 or self.chunk_size < 0:
            raise ValueError("batch_size must be >= 1 and chunk_size >= 0")
        if not 2 <= self.exponent_bits <= 8:
            raise ValueError(f"exponent_bits must be in 2..8, got {self.exponent_bits}")
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {self.rounding!r}")
        object.__setattr__(self, "cutoff", float(self.cutoff))
        if self.criterion not in ("bounded", "paper"):
            raise ValueError(f"criterion must be 'bounded' or 'paper', got {self.criterion!r}")
        object.__setattr__(self, "max_relative_loss", float(self.max_relative_loss))
        object.__setattr__(self, "operands", _format_or_none(self.operands))
        object.__setattr__(self, "product", _format_or_none(self.product))

    # Access -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerPrediction]:
        return iter(self.layers)

    def __getitem__(self, name: str) -> LayerPrediction:
        for layer in self.layers:
            if layer.layer == name:
                return layer
        raise KeyError(f"no layer {name!r} in the plan (layers: "
                       f"{', '.join(l.layer for l in self.layers)})")

    @property
    def layer_names(self) -> Tuple[str, ...]:
        return tuple(dict.fromkeys(layer.layer for layer in self.layers))

    def bits(self) -> Dict[str, Dict[str, int]]:
        """``{layer: {"fwd": m, "bwd": m, "grad": m}}``; a layer of several GEMM sets
        gets, per GEMM, the widest of its sets (its one policy must serve them all)."""
        out: Dict[str, Dict[str, int]] = {}
        for l in self.layers:
            widest = out.setdefault(l.layer, {g: 0 for g in GEMMS})
            for g in GEMMS:
                widest[g] = max(widest[g], l.gemm(g).mantissa_bits)
        return out

    # Transformations ----------------------------------------------------------------------
    def shift(self, bits: int) -> "PrecisionPlan":
        """A new plan with every mantissa bit count moved by ``bits`` (e.g. -1 for the
        tightness experiment), clamped to 0..23."""
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise TypeError(f"shift takes an int number of bits, got {bits!r}")
        return dataclasses.replace(
            self, layers=tuple(l.shift(bits, self._shifted_retention) for l in self.layers),
            offset=self.offset + bits)

    def analytical_retention(self, prediction: GemmPrediction) -> float:
        """The analytical VRR of a GEMM at its ``mantissa_bits`` under this plan's
        product width, chunk size and rounding (docs/vrr.md)."""
        from tfaccum.analysis.vrr import vrr

        n = prediction.effective_length
        chunk = effective_chunk(self.chunk_size, prediction.length, n)
        return vrr(n, prediction.mantissa_bits, self.product_mantissa_bits, chunk,
                   rounding=self.rounding)

    def _shifted_retention(self, gemm: str, prediction: GemmPrediction) -> Optional[float]:
        # A measured retention holds for the measured width only; the analytical one can
        # be recomputed at any width.
        if prediction.basis != "analytical":
            return None
        return self.analytical_retention(prediction)

    def config(self, mantissa_bits: int) -> AccumConfig:
        """The AccumConfig of a GEMM with ``mantissa_bits`` under this plan's settings."""
        return AccumConfig(accumulator=FloatFormat(self.exponent_bits, mantissa_bits),
                           product=self.product, chunk_size=self.chunk_size,
                           rounding=self.rounding)

    def policies_for_bits(self, mantissa_bits: int) -> AccumPolicy:
        """One policy with all three GEMMs at ``mantissa_bits`` under this plan's settings."""
        config = self.config(mantissa_bits)
        return AccumPolicy(fwd=config, bwd=config, grad=config, operands=self.operands)

    def policies(self, exclude: Iterable[str] = ()) -> Dict[str, AccumPolicy]:
        """``{layer_name: AccumPolicy}`` for :func:`tfaccum.rewrite`: accumulators
        ``FloatFormat(exponent_bits, bits)``, this plan's chunk size, product format,
        rounding and operand format. Layers named in ``exclude`` are left out (so
        ``rewrite`` keeps them as they are)."""
        skip = set([exclude] if isinstance(exclude, str) else exclude)
        unknown = skip - set(self.layer_names)
        if unknown:
            raise ValueError(f"exclude names layers not in the plan: {sorted(unknown)}")
        return {name: AccumPolicy(fwd=self.config(m["fwd"]), bwd=self.config(m["bwd"]),
                                  grad=self.config(m["grad"]), operands=self.operands)
                for name, m in self.bits().items() if name not in skip}

    # Serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "model": self.model,
            "batch_size": self.batch_size,
            "product_mantissa_bits": self.product_mantissa_bits,
            "chunk_size": self.chunk_size,
            "cutoff": self.cutoff,
            "exponent_bits": self.exponent_bits,
            "method": self.method,
            "sparsity": self.sparsity,
            "operands": None if self.operands is None else self.operands.to_dict(),
            "product": None if self.product is None else self.product.to_dict(),
            "rounding": self.rounding,
            "offset": self.offset,
            "criterion": self.criterion,
            "max_relative_loss": self.max_relative_loss,
            "statistics": self.statistics,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PrecisionPlan":
        layers = _need(d, "layers", "a precision plan")
        if not isinstance(layers, list):
            raise ValueError("a precision plan's 'layers' must be a list")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown precision plan keys: {sorted(unknown)}")
        kwargs = {k: v for k, v in d.items() if k != "layers"}
        _need(d, "batch_size", "a precision plan")
        for key in ("operands", "product"):
            if kwargs.get(key) is not None:
                kwargs[key] = FloatFormat.from_dict(kwargs[key])
        return cls(layers=tuple(LayerPrediction.from_dict(l) for l in layers), **kwargs)

    def to_json(self, indent: Optional[int] = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "PrecisionPlan":
        return cls.from_dict(json.loads(text))

    def save(self, path: str) -> str:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())
            f.write("\n")
        return path

    @classmethod
    def load(cls, path: str) -> "PrecisionPlan":
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())

    # Display ------------------------------------------------------------------------------
    def criterion_text(self) -> str:
        from tfaccum.analysis.vrr import criterion_description

        return criterion_description(self.criterion, self.cutoff, self.max_relative_loss)

    def header(self) -> str:
        """What the numbers rest on: settings, criterion, and every assumption."""
        acc = f"e{self.exponent_bits}m<bits>"
        chunk = f"chunk {self.chunk_size}" if self.chunk_size else "sequential"
        parts = [f"batch {self.batch_size}", f"products m_p={self.product_mantissa_bits}",
                 chunk, f"accumulators {acc} rounding {self.rounding}",
                 f"sparsity {self.sparsity}", self.method]
        if self.operands is not None:
            parts.append(f"operands {self.operands!r}")
        if self.offset:
            parts.append(f"shifted {self.offset:+d} bits")
        name = f" for {self.model}" if self.model else ""
        lines = [f"Precision plan{name}: " + ", ".join(parts),
                 f"criterion {self.criterion_text()}"]
        if self.statistics:
            lines.append(f"statistics: {self.statistics}")
        return "\n".join(lines)

    def table(self) -> str:
        """The plan as a text table: one row per layer; per GEMM the length ``n``, the
        effective length, and the predicted bits (sequential and chunked when the plan
        is chunked)."""
        chunked = self.chunk_size > 0
        bit_cols = ("seq", f"c{self.chunk_size}") if chunked else ("bits",)
        sub = ("n", "n_eff") + bit_cols + ("VRR",)
        rows = []
        measured = False
        for l in self.layers:
            cells = [l.label]
            for g in GEMMS:
                p = l.gemm(g)
                cells += [str(p.length), str(p.effective_length)]
                mark = "*" if p.basis == "measured" else ""
                measured = measured or bool(mark)
                if chunked:
                    seq = p.sequential_mantissa_bits
                    cells += ["-" if seq is None else str(seq), f"{p.mantissa_bits}{mark}"]
                else:
                    cells.append(f"{p.mantissa_bits}{mark}")
                cells.append("-" if p.retention is None else f"{p.retention:.4f}")
            rows.append(cells)
        head2 = ["layer"] + list(sub) * 3
        ncol = len(head2)
        widths = [max([len(head2[c])] + [len(r[c]) for r in rows]) for c in range(ncol)]
        group = len(sub)

        def line(cells):
            out = cells[0].ljust(widths[0])
            for gi in range(3):
                block = cells[1 + gi * group:1 + (gi + 1) * group]
                w = widths[1 + gi * group:1 + (gi + 1) * group]
                out += " | " + " ".join(c.rjust(wi) for c, wi in zip(block, w))
            return out

        block_widths = [sum(widths[1 + gi * group:1 + (gi + 1) * group]) + group - 1
                        for gi in range(3)]
        head1 = " " * widths[0]
        for gi, title in enumerate(("FWD", "BWD", "GRAD")):
            head1 += " | " + title.center(block_widths[gi])
        rule = "-" * len(line(head2))
        lines = [self.header(), rule, head1, line(head2), rule]
        lines += [line(r) for r in rows]
        lines.append(rule)
        lines.append("VRR: the variance retention predicted at the chosen width" + (
            "; *: bits from a direct measurement with the real kernels on the real batches "
            "(the Gaussian model is far off there)" if measured else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
