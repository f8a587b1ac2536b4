"""Client for the Task Guard sidecar."""

__all__: list[str] = []
