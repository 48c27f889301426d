"""Build script. The csrc/ native extension is added here by its own change; until then this only calls setup()."""

from setuptools import setup

setup()
