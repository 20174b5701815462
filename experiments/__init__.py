"""Reproduction suite for the synthetic-gradient papers.

One module per paper table/figure under ``experiments/<paper>/``, each exposing an
``EXPERIMENT`` (see :mod:`experiments.framework`), registered in :mod:`experiments.registry`
and run with ``python -m experiments run NAME --preset smoke|quick|paper``.
"""
