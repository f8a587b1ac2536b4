"""The gRPC front: the servicer (``api``), how calls are answered (``rpc``), the wire format (``wire``), the Hold and
watch streams, who calls (``auth``, ``peercred``) and where it listens (``listener``).
"""
