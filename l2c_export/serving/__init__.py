"""Serving builds: a Triton Inference Server model repository whose Python model runs ``L2CPipeline`` in-process.

- :mod:`.sampling`: Triton's per-image inputs decoded and checked, and requests merged into sampling batches
  (no Triton imports, so it runs in any environment).
- :mod:`.triton`: the repository writer and the launcher of the ``tritonserver`` that the PyPI wheel
  ``nvidia-pytriton`` bundles.
- ``triton_model.py``: the Triton Python model, copied into every repository as ``NAME/1/model.py``.
"""
