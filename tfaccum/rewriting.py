"""Compatibility alias: ``tfaccum.rewriting`` held the scope hook, the model rewrite and the
summary table, which now live in their own modules (docs/architecture.md):

* :mod:`tfaccum.scope`: ``accumulation_scope``, ``current_scope_policy``;
* :mod:`tfaccum.model_rewrite`: ``rewrite``, ``RewriteReport``, ``NotEmulatedWarning``;
* :mod:`tfaccum.model_summary`: ``summary``;
* :mod:`tfaccum.inventory`: ``gemm_lengths``, ``GemmLengths``.

Every name it exported still imports from here, as the same object.
"""

from tfaccum.inventory import GemmLengths, gemm_lengths  # noqa: F401
from tfaccum.model_rewrite import NotEmulatedWarning, RewriteReport, rewrite  # noqa: F401
from tfaccum.model_summary import summary  # noqa: F401
from tfaccum.scope import accumulation_scope, current_scope_policy  # noqa: F401

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
