"""Build helpers for the op library (used by setup.py and the Makefile)."""
