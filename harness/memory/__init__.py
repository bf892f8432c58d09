"""Memory planner (harness/memory/byte_model.py while the package is split by job)."""
from .byte_model import *  # noqa: F401,F403
