"""The benchmark scripts, run from the repository root as modules: `python -m benchmarks.encode`.

Nothing is imported here: encode_worker.py also runs under the sentence-transformers venv,
which has neither diffcse nor the benchmarks' own dependencies.
"""
