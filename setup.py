"""Thin shim so that legacy tooling (`pip install -e .` with old pips, `python setup.py develop`) works.

All metadata lives in pyproject.toml.
"""

from setuptools import setup

setup()
