"""The ``guided-descent`` command line (argument parsing and printing only)."""
