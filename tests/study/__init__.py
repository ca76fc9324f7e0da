"""Tests of mae_transfer/study/."""
