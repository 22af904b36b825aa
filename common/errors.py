"""The error tree of mlfleet. Each class maps to one HTTP-like status and one Elasticsearch type.

    ApiError                          (status, type, reason)
    ├── BadRequest                    400  status_exception
    │   └── ValidationError           400  action_request_validation_exception
    ├── Unauthorized                  401  security_exception
    ├── Forbidden                     403  security_exception
    ├── NotFound                      404  resource_not_found_exception
    ├── RequestTimeout                408  status_exception
    ├── Conflict                      409  status_exception
    ├── TooManyRequests               429  es_rejected_execution_exception (full queue, retry_after_ms set)
    │                                      status_exception (not enough capacity, retry_after_ms None)
    ├── ServerError                   500  status_exception
    └── ServiceUnavailable            503  status_exception
        └── NoAnswer                  503  transport_exception (client side: the server never answered)

On the wire an error is ``{"error": {"type", "reason"[, "retry_after_ms"]}, "status": N}``.
``from_body`` turns such a body back into the matching class, so a client raises exactly what
the server answered.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status = 500
    type = "status_exception"

    def __init__(self, reason: str, *, status: int | None = None, type: str | None = None,
                 retry_after_ms: int | None = None, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.retry_after_ms = retry_after_ms
        # retryable: the request never started and another node may serve it (client-side retry).
        self.retryable = retryable

    def to_body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.type, "reason": self.reason}
        if self.retry_after_ms is not None:
            err["retry_after_ms"] = self.retry_after_ms
        if self.retryable:
            err["retryable"] = True
        return {"error": err, "status": self.status}

    def __str__(self) -> str:
        return f"[{self.status}] {self.type}: {self.reason}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, status={self.status})"


class BadRequest(ApiError):
    status = 400


class ValidationError(BadRequest):
    type = "action_request_validation_exception"

    def __init__(self, messages: list[str]) -> None:
        self.messages = list(messages)
        reason = "Validation Failed: " + "".join(f"{i}: {m};" for i, m in enumerate(messages, 1))
        super().__init__(reason)


class Unauthorized(ApiError):
    status = 401
    type = "security_exception"


class Forbidden(ApiError):
    status = 403
    type = "security_exception"


class NotFound(ApiError):
    status = 404
    type = "resource_not_found_exception"


class RequestTimeout(ApiError):
    status = 408


class Conflict(ApiError):
    status = 409


class TooManyRequests(ApiError):
    status = 429

    def __init__(self, reason: str, *, retry_after_ms: int | None = None, **kw: Any) -> None:
        kw.setdefault("type", "es_rejected_execution_exception" if retry_after_ms is not None
                      else "status_exception")
        super().__init__(reason, retry_after_ms=retry_after_ms, **kw)


class ServerError(ApiError):
    status = 500


class ServiceUnavailable(ApiError):
    status = 503


_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized, 403: Forbidden, 404: NotFound, 408: RequestTimeout,
    409: Conflict, 429: TooManyRequests, 500: ServerError, 503: ServiceUnavailable,
}


def from_body(body: Any) -> ApiError:
    """Rebuild the error a server answered from its wire body."""
    try:
        status = int(body["status"])
        err = body["error"]
        etype, reason = str(err["type"]), str(err["reason"])
    except (KeyError, TypeError, ValueError):
        return ApiError(f"malformed error body: {body!r}")
    retry = err.get("retry_after_ms")
    retryable = bool(err.get("retryable", False))
    if status == 400:  # validation failures keep their type; their messages are in the reason
        e: ApiError = BadRequest(reason, type=etype)
    elif status == 429:
        e = TooManyRequests(reason, retry_after_ms=retry, type=etype, retryable=retryable)
        return e
    else:
        cls = _BY_STATUS.get(status, ApiError)
        e = cls(reason, status=status, type=etype, retry_after_ms=retry)
    e.retryable = retryable
    return e


class NoAnswer(ServiceUnavailable):
    """Raised by the client, not a server: no answer came from an address in time."""
    type = "transport_exception"
