"""The tables the whole pipeline agrees on: which attacks, sparsifiers, device kinds and artifacts exist, and their
settings. Small and torch-free: the config validates against them before any work starts; stages, report and
sweep read them instead of keeping lists of their own. Implementations are named as ``"module:attr"`` and
imported only where they run (pipeline/core/registry.py)."""
