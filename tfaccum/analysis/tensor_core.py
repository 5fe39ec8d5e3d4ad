"""What a tensor core's accumulation costs each GEMM of a network, and how often to promote.

:func:`predict_tensor_core` walks a Keras model's GEMMs as :func:`tfaccum.analysis.predict`
does (:func:`tfaccum.analysis.predict.walk_gemms`: FWD/BWD/GRAD lengths and sparsity) and,
for each, gives the analytical retention of the hardware's fused-adder chain without
promotion (docs/vrr.md §14), whether it passes the criterion, and the longest promotion
interval ``L 2^k`` that does::

    >>> import tfaccum
    >>> from tfaccum import analysis
    >>> model = tfaccum.models.digits_cnn()
    >>> plan = analysis.predict_tensor_core(model, "hopper:e4m3", batch_size=64,
    ...                                     sparsity=None, promote_every=128)
    >>> print(plan)
    Tensor-core plan for digits_cnn on hopper:e4m3: L=32, F=13, result e8m13 toward-zero, operands e4m3fn, batch 64
    criterion bounded: v(n) = exp(n(1-VRR)) < 50 and 1-VRR <= 0.56 %
    statistics: sparsity none, assumed, not measured
    assumptions (docs/vrr.md 14): C1 operands i.i.d. N(0,1) (after any scaling) rounded to e4m3fn, ...
    ---...
    layer       | GEMM |    n n_eff    1-VRR n(1-VRR) pass     longest n(1-VRR) @128 pass @128 seq bits
    ---...
    conv1       | fwd  |    9     9 5.94e-10 5.34e-09  yes none needed      5.34e-09       yes        3
    ...
    conv1       | grad | 4096  4096 1.78e-06  0.00727  yes none needed      6.55e-05       yes        9
    ...
    0 of 12 GEMMs fail the criterion without promotion. ...
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

from tfaccum.analysis.fused import (FusedSetup, PromotionSearch, fused_setup, fused_vrr,
                                    longest_promotion_interval)
from tfaccum.analysis.plan import GEMMS
from tfaccum.analysis.predict import walk_gemms
from tfaccum.analysis.vrr import (DEFAULT_MAX_RELATIVE_LOSS, criterion_description,
                                  min_mantissa_bits, passes_criterion)

__all__ = ["TensorCoreGemm", "TensorCoreLayer", "TensorCorePlan", "predict_tensor_core",
           "plot_promotion"]


@dataclasses.dataclass(frozen=True)
class TensorCoreGemm:
    """One GEMM on the hardware: ``length`` products per output, ``effective_length`` of
    them non-zero; the analytical retention without promotion and whether it passes; the
    longest passing promotion interval (``length``: none needed; 0: even promoting every
    block fails) and its retention; the retention at the plan's ``promote_every`` (None
    when not asked); and the paper-style sequential width (``min_mantissa_bits`` of the
    nearest-even model for the products' mantissa bits)."""

    length: int
    effective_length: int
    sparsity: float
    search: PromotionSearch
    promoted_vrr: Optional[float]
    promoted_passes: Optional[bool]
    sequential_bits: int

    @property
    def vrr(self) -> float:
        return self.search.vrr

    @property
    def passes(self) -> bool:
        return self.search.passes

    @property
    def interval(self) -> int:
        return self.search.interval


@dataclasses.dataclass(frozen=True)
class TensorCoreLayer:
    layer: str
    kind: str
    fwd: TensorCoreGemm
    bwd: TensorCoreGemm
    grad: TensorCoreGemm

    def gemm(self, name: str) -> TensorCoreGemm:
        if name not in GEMMS:
            raise KeyError(f"GEMM must be one of {GEMMS}, got {name!r}")
        return getattr(self, name)


@dataclasses.dataclass(frozen=True)
class TensorCorePlan:
    """Per layer and GEMM, what ``setup``'s accumulation retains, and the settings."""

    layers: Tuple[TensorCoreLayer, ...]
    setup: FusedSetup
    batch_size: int
    promote_every: int
    cutoff: float
    criterion: str
    max_relative_loss: float
    sparsity: str
    statistics: str
    product_mantissa_bits: int
    model: str = ""

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, name: str) -> TensorCoreLayer:
        for layer in self.layers:
            if layer.layer == name:
                return layer
        raise KeyError(f"no layer {name!r} in the plan")

    def gemms(self):
        """(layer name, GEMM name, TensorCoreGemm) for every GEMM."""
        for layer in self.layers:
            for g in GEMMS:
                yield layer.layer, g, layer.gemm(g)

    def assumptions(self) -> str:
        """Everything the numbers rest on, in words (docs/vrr.md §14)."""
        return (
            "assumptions (docs/vrr.md 14): C1 operands i.i.d. N(0,1) (after any scaling) "
            f"rounded to {self.setup.operands.name}, products exact; the chain of "
            "numerics.md 7 walking K in order, one accumulator per output, no overflow; "
            "B1-B3 the running and exact sums jointly Gaussian, one step per block; C2 D's "
            "last bit at its block's grid; C3 a block's sum Gaussian; C4 residuals uniform "
            "below a grid; C5 zeros keep their slots (a block of L holds L n_eff/n "
            "non-zero products, an interval c holds c n_eff/n); promotion adds chunk "
            f"results in {self.setup.chunk_accumulator.name} nearest-even; seq bits: the "
            f"paper-style sequential nearest-even width for m_p={self.product_mantissa_bits} "
            "(docs/vrr.md 1-7)")

    def header(self) -> str:
        name = f" for {self.model}" if self.model else ""
        lines = [f"Tensor-core plan{name} on {self.setup.describe()}, batch "
                 f"{self.batch_size}",
                 "criterion " + criterion_description(self.criterion, self.cutoff,
                                                      self.max_relative_loss)]
        if self.statistics:
            lines.append(f"statistics: {self.statistics}")
        lines.append(self.assumptions())
        return "\n".join(lines)

    def table(self) -> str:
        """One row per GEMM: n, n_eff, the lost variance without promotion (``1 - VRR``
        and ``n_eff (1 - VRR)``, the criterion's ``ln v(n)``), pass, the longest passing
        promotion interval, the same at ``promote_every``, and the paper-style width."""
        promoted = self.promote_every > 0
        head = ["layer", "GEMM", "n", "n_eff", "1-VRR", "n(1-VRR)", "pass", "longest"]
        if promoted:
            head += [f"n(1-VRR) @{self.promote_every}", f"pass @{self.promote_every}"]
        head += ["seq bits"]
        rows = []
        for name, g, p in self.gemms():
            longest = ("none needed" if p.interval >= p.length else
                       ("none" if p.interval == 0 else str(p.interval)))
            lost = 1.0 - p.vrr
            row = [name, g, str(p.length), str(p.effective_length), f"{lost:.2e}",
                   f"{p.effective_length * lost:.3g}", "yes" if p.passes else "NO", longest]
            if promoted:
                row += [f"{p.effective_length * (1.0 - p.promoted_vrr):.3g}",
                        "yes" if p.promoted_passes else "NO"]
            row.append(str(p.sequential_bits))
            rows.append(row)
        widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]

        def line(cells):
            return (cells[0].ljust(widths[0]) + " | " + cells[1].ljust(widths[1]) + " | "
                    + " ".join(c.rjust(w) for c, w in zip(cells[2:], widths[2:])))

        rule = "-" * len(line(head))
        failing = sum(1 for _, _, p in self.gemms() if not p.passes)
        foot = (f"{failing} of {3 * len(self.layers)} GEMMs fail the criterion without "
                "promotion. n(1-VRR) = ln v(n), the criterion's exponent (passes below "
                f"ln {self.cutoff:g} = {math.log(self.cutoff):.2f}); longest: the longest "
                "promotion interval L 2^k that passes (none needed: no promotion passes)")
        return "\n".join([self.header(), rule, line(head), rule] + [line(r) for r in rows]
                         + [rule, foot])

    def __str__(self) -> str:
        return self.table()

    def distinct_lengths(self) -> Dict[Tuple[int, int], PromotionSearch]:
        """{(n, n_eff): its promotion search}, one entry per distinct GEMM length."""
        out: Dict[Tuple[int, int], PromotionSearch] = {}
        for _, _, p in self.gemms():
            out.setdefault((p.length, p.effective_length), p.search)
        return dict(sorted(out.items()))


def predict_tensor_core(model, tensor_core="hopper:e4m3", batch_size: int = 256, *,
                        promote_every: int = 0, data=None, sparsity="measure",
                        cutoff: float = 50.0, criterion: str = "bounded",
                        max_relative_loss: float = DEFAULT_MAX_RELATIVE_LOSS,
                        max_batches: int = 4, measure_batch_size: Optional[int] = None,
                        loss=None, training: bool = True, seed: int = 0) -> TensorCorePlan:
    """Per GEMM of ``model`` (FWD/BWD/GRAD of every Dense/convolution layer): its length,
    the analytical retention of ``tensor_core``'s accumulation without promotion
    (:func:`tfaccum.analysis.fused_vrr`), whether it passes ``criterion``, the longest
    promotion interval that does, and, with ``promote_every > 0``, the retention at that
    interval.

    ``tensor_core``: an ``"arch:operands"`` spec, a TensorCoreModel or a FusedSetup.
    ``data``, ``sparsity``, ``max_batches``, ``measure_batch_size``, ``loss``,
    ``training``, ``seed``: the GEMM walk's, as :func:`tfaccum.analysis.predict`'s (with
    ``sparsity="measure"`` and no data, sparsity is measured on synthetic inputs and the
    plan says so). The GEMMs' products are modelled as the analysis assumes (i.i.d.
    N(0, 1) operands rounded to the operand format), whatever ``data`` shows; only their
    number is measured.
    """
    setup = fused_setup(tensor_core)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(promote_every, bool) or not isinstance(promote_every, int) \
            or promote_every < 0:
        raise ValueError(f"promote_every must be an int >= 0, got {promote_every!r}")
    passes_criterion(1, 1.0, cutoff, criterion=criterion, max_relative_loss=max_relative_loss)
    walk = walk_gemms(model, batch_size, data, sparsity, max_batches=max_batches,
                      measure_batch_size=measure_batch_size, loss=loss, training=training,
                      seed=seed)
    mp = min(23, 2 * setup.operands.mantissa_bits + 1)
    kwargs = dict(cutoff=cutoff, criterion=criterion, max_relative_loss=max_relative_loss)
    cache: Dict[Tuple[int, int], TensorCoreGemm] = {}

    def gemm(n: int, s: float, n_eff: int) -> TensorCoreGemm:
        if (n, n_eff) not in cache:
            search = longest_promotion_interval(n, setup, effective_length=n_eff, **kwargs)
            promoted = promoted_ok = None
            if promote_every:
                promoted = fused_vrr(n, setup, promote_every, effective_length=n_eff)
                promoted_ok = passes_criterion(max(n_eff, 1), promoted, **kwargs)
            seq = min_mantissa_bits(n_eff, mp, **kwargs) if n_eff > 0 else 0
            cache[n, n_eff] = TensorCoreGemm(n, n_eff, s, search, promoted, promoted_ok, seq)
        return dataclasses.replace(cache[n, n_eff], sparsity=s)

    layers = []
    for entry in walk.layers:
        per = {g: gemm(entry.lengths[g], entry.sparsity[g], entry.effective_length(g))
               for g in GEMMS}
        # A layer of several GEMM sets (attention, separable) has a row per set.
        name = entry.layer.name + (f"/{entry.gemm_set}" if entry.gemm_set else "")
        layers.append(TensorCoreLayer(name, type(entry.layer).__name__, **per))
    return TensorCorePlan(
        layers=tuple(layers), setup=setup, batch_size=batch_size, promote_every=promote_every,
        cutoff=float(cutoff), criterion=criterion, max_relative_loss=float(max_relative_loss),
        sparsity=walk.description,
        statistics=_sparsity_text(walk),
        product_mantissa_bits=mp, model=model.name)


def _sparsity_text(walk) -> str:
    """What the lengths' sparsity rests on (only the number of products is measured)."""
    if walk.stats is None:
        return f"sparsity {walk.description}, assumed, not measured"
    if walk.stats.synthetic:
        return (f"sparsity measured on synthetic N(0,1) inputs ({walk.stats.batches} "
                "batches), NOT real data")
    return f"sparsity measured on {walk.stats.batches} real batches"


def plot_promotion(plan: TensorCorePlan, path: str) -> str:
    """A PNG of the lost variance ``n (1 - VRR)`` against the promotion interval, one
    curve per distinct GEMM length (the last point of each: no promotion), with the
    criterion's ``ln(cutoff)``. Needs matplotlib (ImportError otherwise)."""
    import matplotlib  # noqa: WPS433 - optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: WPS433

    fig, (ax, ax_rel) = plt.subplots(1, 2, figsize=(12, 4.8))
    lengths = plan.distinct_lengths()
    cmap = plt.get_cmap("viridis")
    for i, ((n, n_eff), search) in enumerate(lengths.items()):
        xs = [c for c, _ in search.retention]
        rel = [max(1.0 - v, 1e-15) for _, v in search.retention]
        color = cmap(i / max(1, len(lengths) - 1))
        label = f"n={n}" + (f" (n_eff {n_eff})" if n_eff != n else "")
        ax.plot(xs, [n_eff * r for r in rel], marker="o", ms=3, color=color, label=label)
        ax_rel.plot(xs, rel, marker="o", ms=3, color=color, label=label)
    bound = ax.axhline(math.log(plan.cutoff), color="k", ls="--", lw=1,
                       label=f"ln {plan.cutoff:g}: n(1-VRR) bound")
    ax.legend(handles=[bound], fontsize=7, loc="upper left")
    if plan.criterion == "bounded":
        ax_rel.axhline(plan.max_relative_loss, color="k", ls=":", lw=1,
                       label="1-VRR bound")
    for axis in (ax, ax_rel):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("promotion interval (products; each curve's last point: none)")
        axis.grid(True, which="both", alpha=0.3)
    ax.set_ylabel("n_eff (1 - VRR)")
    ax_rel.set_ylabel("1 - VRR")
    ax_rel.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"{plan.model}: retention against promotion interval on "
                 f"{plan.setup.describe()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
