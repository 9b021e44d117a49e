"""The deployment-file linter the tests use (tests/test_manifests.py); not part of the rayps wheel.

``checks`` holds the per-kind checks and ``main``, ``fields`` what they share. From tests/:
``python -m manifest_lint [FILE ...]`` prints the problems of deploy/'s files (or the named ones).
"""
