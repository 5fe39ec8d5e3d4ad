"""The training driver behind ``python -m tfaccum.training`` (``python -m tfaccum.train``).

Layout (each module is usable on its own; ``cli`` only parses flags):

* ``cli``         the command line (``__main__.py`` runs it; ``tfaccum/train.py`` is an
                  alias kept for the old ``python -m tfaccum.train``).
* ``recipes``     per-model defaults (optimizer, learning-rate schedule, batch, epochs).
* ``settings``    the validated settings of one invocation (``Settings``) and of one run
                  (``RunSpec``): policy kind, offset, chunk size, run directory name.
* ``data``        the datasets: scikit-learn digits (embedded), CIFAR-10 and ImageNet
                  through tensorflow-datasets; deterministic per-epoch order.
* ``policies``    from a ``RunSpec`` to an emulated model: fixed formats, the predicted
                  plan of ``tfaccum.analysis.predict``, layers kept at full precision.
* ``callbacks``   TensorBoard writing (scalars, HParams) and the per-layer accumulation
                  health probe.
* ``experiment``  one run (checkpoints, resume, TensorBoard, progress lines) and an
                  experiment (the runs of ``convergence``/``tightness``, skip finished).
* ``summary``     ``summary.csv`` / ``summary.md``, one row per run.
"""

from tfaccum.training.settings import DriverError, RunSpec, Settings  # noqa: F401
