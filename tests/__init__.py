"""The test suite, a package: shared helpers import as ``tests.<folder>.<module>``."""
