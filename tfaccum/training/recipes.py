"""Per-model training defaults: what a flag left unset means for each network.

* ``resnet32`` on CIFAR-10: the recipe of He et al. (2016), section 4.2: SGD with
  momentum 0.9, learning rate 0.1, weight decay 1e-4, batch 128, the rate divided by 10
  at 50 % and 75 % of training (their 32k and 48k of 64k iterations); 160 epochs.
* ``resnet18`` on ImageNet: SGD 0.9, 0.1, weight decay 1e-4, batch 256, 90 epochs,
  divided by 10 at epochs 30 and 60 (the torchvision reference recipe).
* ``alexnet`` on ImageNet: SGD 0.9, 0.01, weight decay 5e-4, batch 256, 90 epochs,
  divided by 10 at epochs 30 and 60 (Krizhevsky et al. 2012, on a fixed schedule).
* ``digits_cnn`` on the embedded digits: the paper's setting in miniature, FP8 (1,5,2)
  operands (the classifier kept at float32 by ``--keep_full_precision=last``), every
  configuration over 5 seeds, each seed testing on its own fold of a 5-fold split, so
  that all 1,797 images are tested once per configuration; sized so that the default
  tightness experiment (four configurations x five seeds) finishes in under five minutes
  on two CPU cores.

* ``vit_tiny`` on the embedded digits: the digits recipe with Adam (learning rate 2e-3,
  cosine schedule, one warm-up epoch), as transformers are usually trained; its
  attention products and projections are emulated like every other GEMM.

Weight decay is the L2 penalty of the papers: ``wd * w`` is added to each kernel's
gradient (``keras.regularizers.L2(wd / 2)`` on Dense/Conv2D kernels; biases and
BatchNorm parameters are not decayed).
"""

from __future__ import annotations

import dataclasses
from typing import Tuple


@dataclasses.dataclass(frozen=True)
class Recipe:
    dataset: str
    batch_size: int
    epochs: int
    optimizer: str = "sgd"
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "step"
    lr_decay_at: Tuple[float, ...] = (0.5, 0.75)
    lr_decay_factor: float = 0.1
    warmup_epochs: float = 0.0
    operands: str = "none"  # GEMM operand format (--operands)
    seeds: int = 1  # repetitions of every configuration (--seeds)


EPOCHS_DIGITS = 12

RECIPES = {
    "digits_cnn": Recipe(dataset="digits", batch_size=64, epochs=EPOCHS_DIGITS,
                         learning_rate=0.1, lr_schedule="cosine", lr_decay_at=(),
                         operands="fp8", seeds=5),
    "vit_tiny": Recipe(dataset="digits", batch_size=64, epochs=EPOCHS_DIGITS,
                       optimizer="adam", learning_rate=2e-3, weight_decay=0.0,
                       lr_schedule="cosine", lr_decay_at=(), warmup_epochs=1.0,
                       operands="fp8", seeds=5),
    "resnet32": Recipe(dataset="cifar10", batch_size=128, epochs=160),
    "resnet18": Recipe(dataset="imagenet2012", batch_size=256, epochs=90,
                       lr_decay_at=(1 / 3, 2 / 3)),
    "alexnet": Recipe(dataset="imagenet2012", batch_size=256, epochs=90, learning_rate=0.01,
                      weight_decay=5e-4, lr_decay_at=(1 / 3, 2 / 3)),
}

MODELS = tuple(RECIPES)
