"""The one place where Ray's remote-error wrappers are turned back into the user's exception."""

from __future__ import annotations

import ray


def unwrap(error: BaseException) -> BaseException:
    """The original exception inside a ``RayTaskError``/``RayActorError`` chain, when there is one."""
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = error.cause if getattr(error, "cause", None) is not None else None
        if isinstance(cause, BaseException) and not isinstance(cause, ray.exceptions.RayTaskError):
            return cause
        try:
            return error.as_instanceof_cause()
        except Exception:  # noqa: BLE001 - fall back to the wrapper itself
            return error
    return error
