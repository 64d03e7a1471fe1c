"""The ``veilface`` command line: one entry point, one module per role.

Each command module exposes ``register(subparsers)``; commands parse
arguments and call library code. Logging handlers are configured here only.
"""
