"""Installs the `harness` package; metadata lives in setup.cfg."""
from setuptools import setup

setup()
