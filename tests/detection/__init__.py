"""Tests of mae_transfer/detection/."""
