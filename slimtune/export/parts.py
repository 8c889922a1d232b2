"""Moved to slimtune/methods/parts.py (the format lives with the methods that write it). This name stays only
while slimtune/cli.py still imports it here; drop it once cli (and its commands) import methods.parts."""
from __future__ import annotations

from ..methods.parts import PARTS, load, save

__all__ = ["PARTS", "load", "save"]
