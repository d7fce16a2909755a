"""Triton's published examples, rewritten for Nereid's compatibility suite (tests/test_compat_examples.py).

Each module writes a model repository that behaves as an example from NVIDIA's python_backend
`examples/` or Triton's `docs/examples/` does: same model names, configs, tensor names and
results, so the test can call it as the example's client does (switched to gRPC). The model
code is written for this suite, not copied.
"""
