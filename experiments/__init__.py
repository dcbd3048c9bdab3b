"""Experiment configs: ``get_config(arg)`` files, one per experiment family, built on
:mod:`alignjax.configs`."""
