"""Harnesses: programs that drive the project's tools and models from outside to check or demonstrate them — the
demo (tools/demo.py), the side-by-side benchmark (tools/benchmark.py) and the GPU acceptance run
(scripts/gpu_acceptance.sh). They use the library (mae_transfer/, backbones/); the library never imports them
(tests/test_layering.py checks it). Processes they start go through mae_transfer.subprocess_runner.run_process.
"""
