"""sdze_core: the backend-agnostic algorithms of sdze.

Written only against the Python array API standard: this package never
imports a concrete array library. See ``docs/method.md`` for what each part computes.
"""
