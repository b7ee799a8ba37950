"""A small OpenAI-compatible chat completions server on 127.0.0.1, for tests (stdlib http.server).

`transformers serve` would be the real thing, but it needs fastapi, uvicorn, starlette and openai,
which the project does not install; this serves the same /v1/chat/completions shape with any
reply function (e.g. the tiny model through common.generate), records every request it gets, and can
play a script of failures first: an HTTP status with headers, a dropped connection, a 200 whose
body is not a usable chat completion, or a reply that takes its time.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class StubServer:
    """with StubServer(reply) as server: ... server.url, server.requests, server.script."""

    def __init__(self, reply: Callable[[dict], str], script: list | None = None):
        self.reply = reply
        # The next requests' fate: "drop", (status, headers[, message]), bytes (a 200 with that
        # body), or ("sleep", seconds) (the reply, that much later).
        self.script = list(script or [])
        self.requests: list[dict] = []  # {"path", "headers", "body"} of every request received
        self.lock = threading.Lock()

    def __enter__(self) -> "StubServer":
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))
                                  or b"{}")
                with stub.lock:
                    stub.requests.append({"path": self.path, "headers": dict(self.headers),
                                          "body": body})
                    action = stub.script.pop(0) if stub.script else None
                # close the socket without a word: the client sees a dropped connection
                if action == "drop":
                    self.close_connection = True
                    return
                if isinstance(action, bytes):  # a 200 whose body is sent as given
                    self.send_body(200, action)
                    return
                if isinstance(action, tuple) and action[0] == "sleep":  # slow, but it does answer
                    time.sleep(action[1])
                    action = None
                if action is not None:  # (status, headers) or (status, headers, error message)
                    status, headers, message = (*action, f"scripted {action[0]}")[:3]
                    self.send_json(status, {"error": {"message": message}}, headers)
                    return
                if self.path.split("?")[0] != "/v1/chat/completions":
                    self.send_json(404, {"error": {"message": "not found"}})
                    return
                # one generation at a time: the model is shared by the server threads
                with stub.lock:
                    text = stub.reply(body)
                self.send_json(200, {
                    "id": "chatcmpl-stub", "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}]})

            def send_json(self, status: int, obj: dict, headers: dict | None = None):
                self.send_body(status, json.dumps(obj).encode(), headers)

            def send_body(self, status: int, data: bytes, headers: dict | None = None):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client stopped waiting
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def model_reply(model, tok) -> Callable[[dict], str]:
    """A reply function that runs a causal LM on the request's messages (greedy unless a
    temperature > 0 is asked for), as a real OpenAI-compatible server would."""
    import common

    def reply(body: dict) -> str:
        return common.generate(model, tok, [body["messages"]], int(body.get("max_tokens") or 64),
                               temperature=float(body.get("temperature") or 0.0))[0]
    return reply
