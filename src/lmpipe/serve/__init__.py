"""Serve an ONNX export over HTTP with the OpenAI completions and chat completions API (a subset).

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions` (raw text, no chat template) and
`POST /v1/chat/completions` (the conversation rendered with the model's chat template). Both generation
endpoints take max_tokens, temperature, top_p, top_k (an extension), stop, seed, stream and n=1, and stream
as OpenAI does: server-sent events `data: {chunk}`, the last chunk carrying the finish reason, then
`data: [DONE]`. Every bad request is a 4xx with an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}`; the token budget is checked before generation starts.
Given an encoder classifier (`ServeConfig.classifier`), the server also answers `POST /v1/classify`
(`lmpipe.encoder.http`): texts in, per task the label and probabilities out; without one that route is a 404.

Modules: `config` (ServeConfig), `requests` (the request bodies), `errors` (error bodies), `app` (the routes
and `create_app`), `page` (`GET /`: a chat page in plain HTML and JavaScript over the API above),
`scheduler` (continuous batching: concurrent requests share the decode steps of one running batch) and
`guards` (the API key and the body's size and encoding, checked before any route).
"""

from lmpipe.serve.app import create_app, serve
from lmpipe.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve"]
