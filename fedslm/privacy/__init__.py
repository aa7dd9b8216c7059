"""Differential privacy: accounting (pure math) and the DP-SGD step (Opacus)."""
