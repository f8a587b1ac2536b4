"""The benchmark of issue 6: Task Guard against an etcd mutex and a Redis ``SET NX PX`` lock on one machine,
and issue 16's queue of waiters on one key drained by short runs (scenario e, ``bench/queue_handover.py``).

``python -m bench.run`` (or ``python3 .ci/dev.py bench``) starts every server on loopback and runs
``python -m bench.load`` against them in a separate process; see ``bench/run.py``.
"""
