"""Tests of harnesses/ (demo, benchmark, GPU kit, synthetic data)."""
