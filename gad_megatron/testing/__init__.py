"""Test doubles shipped with the package (the suite and the benchmarks start them as processes): nothing in the
product imports this package."""
