"""vitalgate's test suite.

A package so that tests, conftest files and the bench can share helpers as
``tests.util`` and ``tests.services``.
"""
