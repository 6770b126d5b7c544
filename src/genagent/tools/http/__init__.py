"""Remote generator adapters: each a ``GenerationTool`` (or ``EditTool``) speaking one API.

``GenAgentServerTool`` speaks the GenAgent ``POST /generate/`` protocol (``genagent serve``).
Every adapter shares ``RemoteTool``: timeouts, retries with backoff on 408/429/5xx honouring
``Retry-After``, a bound on requests in flight, polling of asynchronous jobs, and checked image
downloads. See ``docs/remote.md``.
"""

from genagent._http import HTTPResponseError
from genagent.tools.http._base import RemoteTool
from genagent.tools.http.genagent_server import GenAgentServerEditTool, GenAgentServerTool

__all__ = [
    "GenAgentServerEditTool",
    "GenAgentServerTool",
    "HTTPResponseError",
    "RemoteTool",
]
