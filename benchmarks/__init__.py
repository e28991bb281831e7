"""The benchmark scripts and the GPU check.

A package, so that ``python -m benchmarks.gpu_check`` from the tree's root finds this folder before any
module of that name elsewhere on the path. The scripts run as files too (``python benchmarks/e2e.py``).
"""
