"""A tiny OpenAI-compatible chat-completions server on 127.0.0.1 that replays scripted replies.

Used to test the LLM policy with the real ``openai`` client over real HTTP: each request pops the next
script entry — a tool call, a malformed reply, plain garbage, an HTTP error or a delay longer than the
client's timeout. Requests are recorded for assertions.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def tool_call(name, arguments, raw=False):
    args = arguments if raw else json.dumps(arguments)
    return {"kind": "json", "body": _completion({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": name, "arguments": args}}]})}


def text_reply(text):
    return {"kind": "json", "body": _completion({"role": "assistant", "content": text})}


def garbage(text="<html>not json</html>", status=200):
    return {"kind": "raw", "body": text, "status": status}


def delay(seconds, then=None):
    return {"kind": "delay", "seconds": seconds, "then": then or text_reply("late")}


def _completion(message):
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "scripted",
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class FakeOpenAI:
    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):  # noqa: N802 - http.server API
                length = int(self.headers.get("Content-Length", 0))
                outer.requests.append(json.loads(self.rfile.read(length) or b"{}"))
                entry = outer.script.pop(0) if outer.script else text_reply("script exhausted")
                if entry["kind"] == "delay":
                    time.sleep(entry["seconds"])
                    entry = entry["then"]
                if entry["kind"] == "json":
                    payload, status, ctype = json.dumps(entry["body"]).encode(), 200, "application/json"
                else:
                    payload, status, ctype = entry["body"].encode(), entry.get("status", 200), "text/html"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self):
        host, port = self.server.server_address
        return f"http://{host}:{port}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
