"""mlfleet: deploy PyTorch models across bare-metal hosts and serve inference on them, with the
semantics of Elasticsearch's trained-model deployment APIs.

The one installed import package. Its subpackages are the repository's folders:

    mlfleet.common       shared by every process: errors, units, the wire codec, messages, the client
    mlfleet.coordinator  the coordinator daemon (one per cluster)
    mlfleet.agent        the node agent, its model hosts and allocation workers (one per host)
    mlfleet.cli          the ``mlfleet`` command, which sits above the daemons and launches them
"""

from mlfleet.common.client import Client
from mlfleet.common.errors import ApiError, NoAnswer, TooManyRequests

__all__ = ["ApiError", "Client", "NoAnswer", "TooManyRequests"]
