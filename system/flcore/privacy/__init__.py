"""Differential privacy: the DP-SGD step (:mod:`.dpsgd`) and its accounting
(:mod:`.accounting`)."""
