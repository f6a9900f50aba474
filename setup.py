"""Only for the optional C speedups; everything else is in pyproject.toml.
A machine without a compiler or Python headers still installs (the pure
Python code is used instead)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("vassal._speedups", ["vassal/_speedups.c"], optional=True)])
