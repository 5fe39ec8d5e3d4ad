"""``tfaccum.summary``: the table of a model's emulated GEMMs.

Per tfaccum layer, the accumulation length of its FWD, BWD and GRAD GEMMs
(:mod:`tfaccum.inventory`) and the AccumConfig of each; then the GEMM layers that stay
float32::

    >>> import keras, tfaccum
    >>> config = tfaccum.AccumConfig("e6m9", chunk_size=64)   # for all three GEMMs
    >>> model = tfaccum.rewrite(keras.Sequential([keras.Input((16,)),
    ...                                           keras.layers.Dense(10, name="fc")]), config)
    >>> text = tfaccum.summary(model, batch_size=256)
    tfaccum summary of model "sequential..." (batch size 256)
    ---...
    Layer (type)     Input shape  GEMM  Length  Accumulation
    ---...
    fc (AccumDense)  (None, 16)   FWD   16      e6m9, exact products, chunk 64, nearest-even
                                  BWD   10      e6m9, exact products, chunk 64, nearest-even
                                  GRAD  256     e6m9, exact products, chunk 64, nearest-even
    ---...
    Emulated layers: 1
"""

from __future__ import annotations

from typing import Optional

from tfaccum.config import AccumConfig
from tfaccum.inventory import gemm_classes, gemm_lengths, not_emulated_reason, walk
from tfaccum.layers import TWINS

__all__ = ["summary"]


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
    See :func:`tfaccum.inventory.gemm_lengths` for the numbers as data.
    """
    rows = gemm_lengths(model, batch_size)
    header = ("Layer (type)", "Input shape", "GEMM", "Length", "Accumulation")
    table = []
    for row in rows:
        label = f"{row.layer} ({row.kind}{', ' + row.gemm if row.gemm else ''})"
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
    classes = gemm_classes()
    others = []
    for layer, _ in walk(model):
        reason = not_emulated_reason(layer, classes)
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
