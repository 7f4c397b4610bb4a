import http.server
import socket
import threading

import pytest

from regmix.probe import http_status


@pytest.fixture
def server():
    """A real HTTP server on a free port: /ok answers 200, anything else 401 (a login wall)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/ok" else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def test_a_server_answers_with_its_status_error_statuses_too(server):
    assert http_status(f"{server}/ok", timeout=5) == 200
    assert http_status(f"{server}/login", timeout=5) == 401


def test_nothing_listening_is_an_os_error():
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(OSError):
        http_status(f"http://127.0.0.1:{port}/health", timeout=5)
