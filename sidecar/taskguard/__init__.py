"""Task Guard: a per-host sidecar that lets exactly one run of a logical task hold its guard."""

__version__ = "0.1.0"
