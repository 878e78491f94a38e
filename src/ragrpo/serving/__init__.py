"""Serving: the OpenAI-compatible HTTP server and its web page (`server`, `web/index.html`), and the
request bodies it accepts (`request_bodies`). Nothing is imported here, so that FastAPI loads only
for `ragrpo serve`."""
