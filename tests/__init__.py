"""vitalgate's test suite.

A package so that tests and conftest files can share helpers. ``tests.harness``
(services, the gateway as a process, samplers, waits) is the one part the bench
imports too.
"""
