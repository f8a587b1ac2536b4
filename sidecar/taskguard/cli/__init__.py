"""The ``taskguard`` command: its subcommands (``main``), ``taskguard run`` (``run``), what they share (``common``) and
``taskguard doctor`` (``doctor``).
"""
