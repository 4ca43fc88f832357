"""Model backends behind one interface (:class:`Backend`), picked by name from a config.

``transformers`` (any local or hub image-text model), ``vllm`` (the vLLM engine, in
``.venv-vllm``) and ``openai`` (any OpenAI-compatible chat endpoint). Their modules are imported
only when that backend is created.
"""

from serve_apps.backends.base import (
    Backend,
    BackendConfig,
    ChatMessage,
    ChatReply,
    available_backends,
    create_backend,
    decode_image,
    register_backend,
)

__all__ = [
    "Backend",
    "BackendConfig",
    "ChatMessage",
    "ChatReply",
    "available_backends",
    "create_backend",
    "decode_image",
    "register_backend",
]
