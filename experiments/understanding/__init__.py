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

SG_EXAMPLE_SCALE = 1.0
"""``example_scale`` of every split in this folder: the paper's SG modules regress
``∂L/∂h`` of the loss as written (supp. C: "trained to minimise ‖SG(h, y) − ∂L/∂h‖²", with
``L`` the batch-mean loss), not the per-example gradients sgjax regresses by default
(:class:`sgjax.feedback.InterfaceSpec`). The two differ only in how Adam's steps on the SG
compare with the size of its targets; with per-example targets the linear SG of supp.
Table 2 no longer ends worse than backprop on separable data at the ``quick`` budget
(measured: shallow ``linear2`` log loss, 600 full-batch steps of Adam 1e-2: SG − backprop
= −0.026 with per-example targets, > 5e-3 with the paper's)."""
