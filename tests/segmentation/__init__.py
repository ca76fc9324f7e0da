"""Tests of mae_transfer/segmentation/."""
