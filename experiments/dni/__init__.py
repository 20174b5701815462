"""Jaderberg et al. 2016, "Decoupled Neural Interfaces using Synthetic Gradients": one
module per table or figure.

* :mod:`~experiments.dni.table1` — Table 1 (both panels) and Fig. 11: every-layer DNI on
  MNIST and CIFAR-10 FCNs and CNNs, No Bprop / Bprop / DNI / cDNI (§3.1, Appendix A.1).
"""
