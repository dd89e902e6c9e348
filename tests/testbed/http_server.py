"""A loopback HTTP server for the image corpus, with the failure modes a LAION download meets.

Paths: `/img/<name>` the corpus file; `/404`; `/500`; `/redirect/<name>` (302 to the image);
`/slow/<name>` (the image after `slow_seconds`). `hits` counts requests per path, so tests can tell
what was downloaded again.
"""

from __future__ import annotations

import collections
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .corpus import CorpusItem


class ImageServer:
    """Serves `files` (name -> bytes) on 127.0.0.1 at an ephemeral port. Use as a context manager."""

    def __init__(self, items: list[CorpusItem] | dict[str, bytes], slow_seconds: float = 3.0):
        self.files = dict(items) if isinstance(items, dict) else {i.name: i.data for i in items}
        self.slow_seconds = slow_seconds
        self.hits: collections.Counter[str] = collections.Counter()
        self._httpd = ThreadingHTTPServer(('127.0.0.1', 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f'http://127.0.0.1:{self._httpd.server_address[1]}'

    def url(self, name: str, kind: str = 'img') -> str:
        """URL of a corpus file; kind is 'img', 'redirect' or 'slow'."""
        return f'{self.base_url}/{kind}/{name}'

    @property
    def url_404(self) -> str:
        return f'{self.base_url}/404'

    @property
    def url_500(self) -> str:
        return f'{self.base_url}/500'

    def start(self) -> ImageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                server.hits[self.path] += 1
                parts = self.path.strip('/').split('/', 1)
                kind, name = (parts + [''])[:2]
                if kind == 'redirect' and name in server.files:
                    self.send_response(302)
                    self.send_header('Location', server.url(name))
                    self.send_header('Content-Length', '0')
                    self.end_headers()
                    return
                if kind == '500':
                    return self._send(500, b'internal error')
                if kind in ('img', 'slow') and name in server.files:
                    if kind == 'slow':
                        time.sleep(server.slow_seconds)
                    return self._send(200, server.files[name], 'application/octet-stream')
                self._send(404, b'not found')

            def _send(self, code: int, body: bytes, ctype: str = 'text/plain') -> None:
                self.send_response(code)
                self.send_header('Content-Type', ctype)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
