"""Client for the Task Guard sidecar: may I start ``<session_key>::<task_name>`` now?

    async with AsyncClient() as client:
        async with client.hold("session-42::nightly-report", ttl=30) as lease:
            await build_report(fencing_token=lease.fencing_token)

``Client`` has the same methods, blocking. Everything here depends on grpcio
and protobuf only; OpenTelemetry context is passed on when it is installed.
"""

from taskguard_client._aio import AsyncWatch
from taskguard_client._aio_hold import AsyncHold
from taskguard_client._call import default_address
from taskguard_client._client import AsyncClient, Client
from taskguard_client._errors import (
    AlreadyRunning,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LeaseLost,
    LeaseNotFoundError,
    LockDelayed,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    QueueFull,
    ResourceExhaustedError,
    RetryRequiresApproval,
    StatusError,
    Superseded,
    TaskGuardError,
    UnavailableError,
    WaitTimedOut,
)
from taskguard_client._models import (
    EventType,
    Guard,
    GuardEvent,
    GuardState,
    Holder,
    KeyPolicy,
    Lease,
    Outcome,
    RunStatus,
    Waiter,
)
from taskguard_client._protocol import Conflict, OnConflict, RetryPolicy
from taskguard_client._sync import Watch
from taskguard_client._sync_hold import Hold

__version__ = "0.1.0"

__all__ = [
    "AlreadyRunning",
    "AsyncClient",
    "AsyncHold",
    "AsyncWatch",
    "Client",
    "Conflict",
    "DeadlineExceededError",
    "EventType",
    "FailedPreconditionError",
    "Guard",
    "GuardEvent",
    "GuardState",
    "Hold",
    "Holder",
    "InternalError",
    "InvalidArgumentError",
    "KeyPolicy",
    "Lease",
    "LeaseLost",
    "LeaseNotFoundError",
    "LockDelayed",
    "NotFoundError",
    "OnConflict",
    "OutOfRangeError",
    "Outcome",
    "PermissionDeniedError",
    "QueueFull",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RetryRequiresApproval",
    "RunStatus",
    "StatusError",
    "Superseded",
    "TaskGuardError",
    "UnavailableError",
    "WaitTimedOut",
    "Waiter",
    "Watch",
    "__version__",
    "default_address",
]
