"""The public names of taskguard_client, pinned: removing or renaming one is an API change."""

from __future__ import annotations

import subprocess
import sys

import taskguard_client

EXPORTED = {
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
    "Holder",
    "Hold",
    "InternalError",
    "InvalidArgumentError",
    "KeyPolicy",
    "QueueFull",
    "Superseded",
    "WaitTimedOut",
    "Waiter",
    "Lease",
    "LeaseLost",
    "LeaseNotFoundError",
    "LockDelayed",
    "NotFoundError",
    "OnConflict",
    "OutOfRangeError",
    "Outcome",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RetryRequiresApproval",
    "RunStatus",
    "StatusError",
    "TaskGuardError",
    "UnavailableError",
    "Watch",
    "__version__",
    "default_address",
}


def test_all_lists_exactly_the_public_names() -> None:
    assert set(taskguard_client.__all__) == EXPORTED
    assert len(taskguard_client.__all__) == len(EXPORTED)


def test_every_exported_name_exists_and_says_it_belongs_to_the_package() -> None:
    for name in taskguard_client.__all__:
        value = getattr(taskguard_client, name)
        if hasattr(value, "__module__") and isinstance(value, type):
            assert value.__module__.startswith("taskguard_client"), name


def test_every_client_error_shares_one_base() -> None:
    errors = [
        getattr(taskguard_client, name)
        for name in taskguard_client.__all__
        if isinstance(getattr(taskguard_client, name), type)
        and issubclass(getattr(taskguard_client, name), BaseException)
    ]
    assert errors and all(issubclass(error, taskguard_client.TaskGuardError) for error in errors)
    assert issubclass(taskguard_client.LeaseLost, taskguard_client.FailedPreconditionError)
    assert issubclass(taskguard_client.LeaseNotFoundError, taskguard_client.NotFoundError)


def test_the_client_imports_nothing_from_the_sidecar() -> None:
    code = "import sys, taskguard_client; sys.exit(any(m.split('.')[0] == 'taskguard' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_blocking_and_async_clients_have_the_same_methods() -> None:
    def public(cls: type) -> set[str]:
        return {name for name in vars(cls) if not name.startswith("_")}

    assert public(taskguard_client.Client) == public(taskguard_client.AsyncClient)
