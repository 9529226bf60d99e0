"""Ligero: make small language models lighter and prove what that cost."""

__version__ = "0.1.0"
