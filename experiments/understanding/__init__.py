"""Czarnecki et al. 2017, "Understanding Synthetic Gradients and Decoupled Neural
Interfaces": one module per table or figure.

* :mod:`~experiments.understanding.table1` — Table 1, the unified view of "conspiring"
  methods (SG, SG + prop, Bprop, DFA, FA, Kickback), rows printed from ``sgjax.feedback``
  and one MNIST network trained with each.
* :mod:`~experiments.understanding.table2` — supp. Table 2, SG vs backprop on artificial
  data (linear / deep linear models, MSE / log loss).
* :mod:`~experiments.understanding.fig6` — Fig. 6 / supp. A, a critical point that SG
  introduces.
* :mod:`~experiments.understanding.theorem1` — Theorem 1 (supp. B) checked numerically.
* ``fig2``, ``fig3``, ``fig4``, ``fig5``, ``fig8`` and :mod:`nets` — §4–5's figures.
"""

PAPER = "Understanding Synthetic Gradients and DNIs (Czarnecki et al. 2017)"
"""The ``paper`` field shared by every experiment of this folder."""
