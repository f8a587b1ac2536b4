"""The one way in (``engine``) and what lives between commits: leases and their deadlines (``leases``), watchers and
waiters for a run's end (``events``).
"""
