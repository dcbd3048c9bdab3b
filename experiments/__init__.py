"""Experiment configs: ``get_config(arg)`` files, one per experiment family (see common.py)."""
