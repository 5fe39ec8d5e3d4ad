"""Builds tfaccum and its TensorFlow op library.

    pip install --no-build-isolation -e ".[cpu,test]"     # CPU build (needs g++)
    TFACCUM_CUDA=1 pip install --no-build-isolation -e .  # + CUDA kernels (needs nvcc)
    make                                                  # rebuild the library in place

The op library is compiled against the TensorFlow already installed in the environment
(hence --no-build-isolation), with exactly its compile and link flags.
"""

import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools import Extension

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from custom_ops import build as ops_build  # noqa: E402


class BuildOpLibrary(build_ext):
    """Compiles custom_ops/ into tfaccum/_tfaccum_ops.so with TensorFlow's flags."""

    def build_extension(self, ext):
        out_path = self.get_ext_fullpath(ext.name)
        if self.inplace:
            out_path = os.path.join(ops_build.ROOT, "tfaccum", os.path.basename(out_path))
        ops_build.build_library(out_path, cuda=ops_build.cuda_requested(), verbose=True)
        # An editable install (PEP 660) builds in a temporary directory and copies only the
        # library into the source tree: its TensorFlow-version record must be there too.
        in_tree = os.path.join(ops_build.ROOT, "tfaccum", os.path.basename(out_path))
        if os.path.abspath(in_tree) != os.path.abspath(out_path):
            ops_build.write_version_record(in_tree)

    def get_ext_filename(self, ext_name):
        # A plain shared library loaded by tf.load_op_library, not a Python extension.
        return os.path.join(*ext_name.split(".")) + ".so"


setup(
    name="tfaccum",
    version="0.1.0",
    description="TensorFlow/Keras ops, layers and analysis for training with narrow "
                "floating-point accumulators (Sakr et al., ICLR 2019, and beyond)",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["tfaccum", "tfaccum.*"]),
    ext_modules=[Extension("tfaccum._tfaccum_ops", sources=[])],
    cmdclass={"build_ext": BuildOpLibrary},
    # Every third-party module tfaccum imports (tests/test_packaging.py checks the list
    # against the imports); TensorFlow itself comes from an extra or is already installed.
    install_requires=["numpy", "absl-py", "keras>=3", "tensorboard", "tensorflow-datasets",
                      "scikit-learn", "scipy"],
    extras_require={
        # tensorflow and tensorflow-cpu are two distributions of one module: pick one.
        "cpu": ["tensorflow-cpu==2.21.0"],
        "gpu": ["tensorflow==2.21.0"],
        "plot": ["matplotlib"],
        "test": ["pytest", "matplotlib"],
    },
    # A console script calls its function with no arguments and exits with its return
    # value: both mains read sys.argv and return an exit status.
    entry_points={"console_scripts": [
        "tfaccum-train=tfaccum.train:main",
        "tfaccum-analyze=tfaccum.analyze:main",
    ]},
    zip_safe=False,
)
