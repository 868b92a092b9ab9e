"""Differential privacy: accounting, the ledger, the DP-SGD engine for denoisers, the empirical audit."""
