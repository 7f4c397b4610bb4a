"""A small JSON HTTP API on 127.0.0.1 for testing real clients (kfp.Client, kubernetes) offline.

Routes map (method, path regex) to a handler `(match, query, body) -> (status, payload)`; every
request is recorded. The server shuts itself down after `lifetime` seconds even if a test hangs.
"""

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

Handler = Callable[[re.Match, dict, dict], tuple[int, dict | str]]


class FakeApi:
    def __init__(self, routes: dict[tuple[str, str], Handler], lifetime: float = 60.0):
        self.routes = [(method, re.compile(pattern + "$"), handler)
                       for (method, pattern), handler in routes.items()]
        self.requests: list[tuple[str, str, dict, dict]] = []  # method, path, query, body
        self.lifetime = lifetime
        api = self

        class Request(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def handle_one(self):
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                api.requests.append((self.command, url.path, query, body))
                for method, pattern, handler in api.routes:
                    match = pattern.match(url.path)
                    if method == self.command and match:
                        try:
                            status, payload = handler(match, query, body)
                        except Exception as e:  # a broken fake answers, never hangs up
                            status, payload = 500, {"message": f"fake handler failed: {e!r}"}
                        break
                else:
                    status, payload = 404, {"message": f"no route for {self.command} {url.path}"}
                text = payload if isinstance(payload, str) else json.dumps(payload)
                self.send_response(status)
                self.send_header("Content-Type",
                                 "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(text.encode())))
                self.end_headers()
                self.wfile.write(text.encode())

            do_GET = do_POST = do_DELETE = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Request)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeApi":
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.timer = threading.Timer(self.lifetime, self.server.shutdown)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def calls(self, method: str, path_pattern: str) -> list[tuple[dict, dict]]:
        """(query, body) of the recorded requests matching the method and path regex."""
        pattern = re.compile(path_pattern + "$")
        return [(q, b) for m, p, q, b in self.requests if m == method and pattern.match(p)]
