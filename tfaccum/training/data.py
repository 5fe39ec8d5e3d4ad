"""Datasets for the driver, with an order that depends only on ``(seed, epoch)``.

* ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits (shipped inside the
  package, no download), scaled to [0, 1] and standardized with the training set's mean
  and standard deviation; a fixed stratified 5-fold split (``random_state=0``): the run
  of seed ``s`` tests on fold ``s mod 5`` (359-360 images) and trains on the other four,
  so that five consecutive seeds test every image exactly once. All runs of one seed
  share the split.
* ``cifar10``: tensorflow-datasets ``cifar10`` (train 50,000 / test 10,000); per-channel
  standardization; training images padded by 4, randomly cropped to 32x32 and flipped
  (He et al. 2016).
* ``imagenet2012``: tensorflow-datasets ``imagenet2012`` (train / validation), which
  needs the manually downloaded archives prepared under ``--data_dir``; training crops
  of random area (8-100 %) and aspect ratio (3/4-4/3) resized to ``--image_size`` and
  flipped; evaluation resizes the short side to ``image_size / 0.875`` and takes the
  centre crop.

The TFDS datasets are read with ``download=False``: when the data is absent the driver
stops at once with a one-line error instead of trying (and, offline, hanging on) a
download.

Determinism: each epoch's shuffle and augmentation use seeds derived from
``(seed, epoch)`` only (stateless random ops keyed by the example's position), so a run
resumed at epoch ``k`` sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from tfaccum.training.settings import DriverError, Settings

AUTOTUNE = tf.data.AUTOTUNE

_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's shuffle and augmentation."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2 ** 31 - 1)


@dataclasses.dataclass
class Data:
    """A dataset ready for training: ``train(epoch)``, ``test()``, a fixed probe batch.

    ``train_base`` yields single ``(image, label)`` pairs in a fixed order (cached where
    it fits in memory); ``augment(image, seed)`` is the stateless training augmentation.
    """

    name: str
    input_shape: Tuple[int, ...]
    classes: int
    train_size: int
    test_size: int
    train_base: tf.data.Dataset
    test_base: tf.data.Dataset
    augment: Optional[Callable] = None
    shuffle_buffer: int = 0

    def train(self, seed: int, epoch: int, batch_size: int) -> tf.data.Dataset:
        """The epoch's batches: shuffled by ``(seed, epoch)``, incomplete batch dropped
        (every step accumulates over the same batch size, the one the plan assumed)."""
        s = epoch_seed(seed, epoch)
        ds = self.train_base.shuffle(self.shuffle_buffer or self.train_size, seed=s,
                                     reshuffle_each_iteration=False)
        if self.augment is not None:
            augment = self.augment
            ds = ds.enumerate().map(
                lambda i, xy: (augment(xy[0], tf.stack([tf.cast(s, tf.int64), i])), xy[1]),
                num_parallel_calls=AUTOTUNE, deterministic=True)
        return ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)

    def test(self, batch_size: int) -> tf.data.Dataset:
        return self.test_base.batch(batch_size).prefetch(AUTOTUNE)

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.train_size // batch_size

    def probe(self, size: int) -> Tuple[np.ndarray, np.ndarray]:
        """The first ``size`` test examples: the fixed batch of the health probe."""
        x, y = next(iter(self.test_base.batch(size)))
        return x.numpy(), y.numpy()

    def first_batches(self, seed: int, batch_size: int, count: int) -> List[Tuple]:
        """The first ``count`` training batches of epoch 0 (for the precision analysis)."""
        return [(x.numpy(), y.numpy())
                for x, y in self.train(seed, 0, batch_size).take(count)]


# --------------------------------------------------------------------------------------
DIGITS_FOLDS = 5


def load(settings: Settings, seed: int = 0) -> Data:
    """The dataset of ``settings`` for the runs of ``seed`` (``DriverError`` if it is
    missing or too small)."""
    loader = {"digits": _digits, "cifar10": _cifar10, "imagenet2012": _imagenet}
    data = loader[settings.dataset](settings, seed)
    if settings.max_train_examples:
        data.train_size = min(data.train_size, settings.max_train_examples)
        data.train_base = data.train_base.take(data.train_size)
    if settings.max_test_examples:
        data.test_size = min(data.test_size, settings.max_test_examples)
        data.test_base = data.test_base.take(data.test_size)
    if data.train_size < settings.batch_size:
        raise DriverError(f"--batch_size: {settings.batch_size} is larger than the "
                          f"{data.train_size} training examples of {data.name}")
    return data


def digits_fold(seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) of the digits for the runs of ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import StratifiedKFold

    y = load_digits().target
    folds = StratifiedKFold(n_splits=DIGITS_FOLDS, shuffle=True, random_state=0)
    train, test = list(folds.split(np.zeros(len(y)), y))[seed % DIGITS_FOLDS]
    return train, test


def _digits(settings: Settings, seed: int) -> Data:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]
    y = digits.target.astype(np.int32)
    train, test = digits_fold(seed)
    x_train, x_test, y_train, y_test = x[train], x[test], y[train], y[test]
    mean, std = float(x_train.mean()), float(x_train.std())
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    return Data(name="digits", input_shape=(8, 8, 1), classes=10,
                train_size=len(x_train), test_size=len(x_test),
                train_base=tf.data.Dataset.from_tensor_slices((x_train, y_train)),
                test_base=tf.data.Dataset.from_tensor_slices((x_test, y_test)))


def _tfds_split(name: str, split: str, data_dir: str):
    """``tfds.load(..., download=False)``: the data must already be prepared."""
    import tensorflow_datasets as tfds

    try:
        ds, info = tfds.load(name, split=split, data_dir=data_dir, download=False,
                             as_supervised=True, with_info=True, shuffle_files=False)
    except Exception as err:  # noqa: BLE001 - tfds raises AssertionError and others
        how = ("place the ILSVRC2012 archives in <data_dir>/downloads/manual and run "
               "`tfds build imagenet2012`" if name == "imagenet2012" else
               f"run `tfds build {name} --data_dir={data_dir}` on a machine with network")
        raise DriverError(f"--dataset={name}: no prepared {name} data in {data_dir} "
                          f"(downloads are off: {how})") from err
    try:
        size = info.splits[split].num_examples
    except (KeyError, AttributeError):
        size = 0
    if not size:  # metadata without split sizes (e.g. tfds.testing.mock_data): count
        size = int(ds.reduce(np.int64(0), lambda n, _: n + 1).numpy())
    classes = info.features["label"].num_classes
    return ds, size, classes


def _normalize(image, mean, std):
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(mean)) / tf.constant(std)


def _cifar10(settings: Settings, seed: int) -> Data:
    train, n_train, classes = _tfds_split("cifar10", "train", settings.data_dir)
    test, n_test, _ = _tfds_split("cifar10", "test", settings.data_dir)

    def prepare(image, label):
        return _normalize(image, _CIFAR_MEAN, _CIFAR_STD), tf.cast(label, tf.int32)

    def augment(image, seed):
        image = tf.pad(image, [[4, 4], [4, 4], [0, 0]], mode="REFLECT")
        image = tf.image.stateless_random_crop(image, [32, 32, 3], seed=seed)
        return tf.image.stateless_random_flip_left_right(image, seed=seed + 1)

    return Data(name="cifar10", input_shape=(32, 32, 3), classes=classes,
                train_size=n_train, test_size=n_test,
                # Cache the uint8 images (150 MB), not the float32 ones (four times more).
                train_base=train.cache().map(prepare, num_parallel_calls=AUTOTUNE),
                test_base=test.cache().map(prepare, num_parallel_calls=AUTOTUNE),
                augment=augment)


def _imagenet(settings: Settings, seed: int) -> Data:
    size = settings.image_size
    train, n_train, classes = _tfds_split("imagenet2012", "train", settings.data_dir)
    test, n_test, _ = _tfds_split("imagenet2012", "validation", settings.data_dir)

    def train_prepare(image, label):
        return image, tf.cast(label, tf.int32)

    def augment(image, seed):
        bbox = tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4])
        begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image), bbox, seed=seed, min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
            max_attempts=10, use_image_if_no_bounding_boxes=True)
        crop = tf.slice(image, begin, extent)
        crop = tf.image.resize(crop, [size, size])
        crop = tf.image.stateless_random_flip_left_right(crop, seed=seed + 1)
        return (crop / 255.0 - tf.constant(_IMAGENET_MEAN)) / tf.constant(_IMAGENET_STD)

    def test_prepare(image, label):
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = (size / 0.875) / tf.reduce_min(shape)
        image = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32))
        image = tf.image.resize_with_crop_or_pad(image, size, size)
        return ((image / 255.0 - tf.constant(_IMAGENET_MEAN)) / tf.constant(_IMAGENET_STD),
                tf.cast(label, tf.int32))

    return Data(name="imagenet2012", input_shape=(size, size, 3), classes=classes,
                train_size=n_train, test_size=n_test,
                train_base=train.map(train_prepare), test_base=test.map(
                    test_prepare, num_parallel_calls=AUTOTUNE),
                augment=augment, shuffle_buffer=2_048)  # decoded images: ~1 GB
