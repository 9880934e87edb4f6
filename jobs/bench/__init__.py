"""Benchmarks: ``python -m jobs.bench train|loader|e2e|preprocess|eval``. No Ray, no MLflow."""
