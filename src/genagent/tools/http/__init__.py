"""Remote generator adapters: each a ``GenerationTool`` (or ``EditTool``) speaking one API.

* ``GenAgentServerTool`` / ``GenAgentServerEditTool``: the GenAgent ``POST /generate/`` protocol
  (``genagent serve``, the GenAgent authors' generator servers);
* ``OpenAIImagesTool`` / ``OpenAIImageEditTool``: the OpenAI Images API (gpt-image-1, dall-e);
* ``BFLTool`` / ``BFLEditTool``: Black Forest Labs (submit, poll ``polling_url``);
* ``FalTool`` / ``FalEditTool``: fal.ai's queue API (submit, status, result, cancel);
* ``ReplicateTool`` / ``ReplicateEditTool``: Replicate predictions (``Prefer: wait``, polling);
* ``ComfyUITool`` / ``ComfyUIEditTool``: a ComfyUI workflow in the API format;
* ``A1111Tool`` / ``A1111EditTool``: AUTOMATIC1111 / Forge (txt2img, img2img).

Every adapter shares ``RemoteTool``: timeouts, retries with backoff and jitter on dropped
connections, 408/429/5xx (honouring ``Retry-After`` and rate-limit headers), a bound on requests
in flight, polling of asynchronous jobs within the run's budget, checked image downloads, and API
keys that never appear in logs, errors or trajectories. See ``docs/remote.md``.
"""

from genagent._http import HTTPResponseError
from genagent.tools.http._base import RemoteTool
from genagent.tools.http.a1111 import A1111EditTool, A1111Tool
from genagent.tools.http.bfl import BFLEditTool, BFLTool
from genagent.tools.http.comfyui import ComfyUIEditTool, ComfyUITool
from genagent.tools.http.fal import FalEditTool, FalTool
from genagent.tools.http.genagent_server import GenAgentServerEditTool, GenAgentServerTool
from genagent.tools.http.openai_images import OpenAIImageEditTool, OpenAIImagesTool
from genagent.tools.http.replicate import ReplicateEditTool, ReplicateTool

__all__ = [
    "A1111EditTool",
    "A1111Tool",
    "BFLEditTool",
    "BFLTool",
    "ComfyUIEditTool",
    "ComfyUITool",
    "FalEditTool",
    "FalTool",
    "GenAgentServerEditTool",
    "GenAgentServerTool",
    "HTTPResponseError",
    "OpenAIImageEditTool",
    "OpenAIImagesTool",
    "RemoteTool",
    "ReplicateEditTool",
    "ReplicateTool",
]
