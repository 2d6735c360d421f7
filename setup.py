"""Build script. Metadata lives in pyproject.toml; the optional CUDA extension (csrc/) will be added here."""

from setuptools import setup

setup()
