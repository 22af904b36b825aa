"""mlfleet: deploy PyTorch models across bare-metal hosts and serve inference on them, with the
semantics of Elasticsearch's trained-model deployment APIs.

The one installed import package. Its subpackages are the repository's folders:

    mlfleet.common       shared by every process: errors, units, the wire codec, messages, the client
    mlfleet.coordinator  the coordinator daemon (one per cluster)
    mlfleet.agent        the node agent, its model hosts and allocation workers (one per host)
    mlfleet.cli          the ``mlfleet`` command, which sits above the daemons and launches them
"""

from typing import Any

__all__ = ["ApiError", "AsyncClient", "Client", "NoAnswer", "TooManyRequests"]


def __getattr__(name: str) -> Any:
    """The public names load on first use, so a daemon's subprocess that imports one module of
    the package (a model host) does not pull in the client, ZeroMQ and numpy with it."""
    if name == "Client":
        from mlfleet.common.client import Client
        return Client
    if name == "AsyncClient":
        from mlfleet.common.aclient import AsyncClient
        return AsyncClient
    if name in ("ApiError", "NoAnswer", "TooManyRequests"):
        from mlfleet.common import errors
        return getattr(errors, name)
    raise AttributeError(f"module 'mlfleet' has no attribute {name!r}")
