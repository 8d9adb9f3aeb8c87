"""Real loopback HTTP servers for the remote-shard tests: ``python -m http.server``, and the same server
with a handler that drops the connection half way through a shard's body (``python http_servers.py``)."""

from __future__ import annotations

import collections
import contextlib
import http.server
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, ClassVar


class Server:
    """A running server; ``gets(name)`` counts the requests for a file in its access log so far."""

    def __init__(self, url: str, log: Path) -> None:
        self.url, self.log = url, log

    def gets(self, name: str) -> int:
        return len(re.findall(rf'"GET /{re.escape(name)} HTTP', self.log.read_text()))


@contextlib.contextmanager
def serve(folder: Path, drops: int = 0) -> Iterator[Server]:
    """Serve ``folder`` on 127.0.0.1 (a free port); with ``drops``, the first ``drops`` GETs of each .tar
    send half of it, then close the connection."""
    here = ["-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(folder)]
    command = [sys.executable, "-u", *([__file__, str(folder), str(drops)] if drops else here)]
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            banner = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 40123 (http://...) ..."
            port = re.search(r"port (\d+)", banner)
            assert port, f"no server banner: {banner!r} {Path(log.name).read_text()}"
            yield Server(f"http://127.0.0.1:{port[1]}", Path(log.name))
        finally:
            proc.terminate()
            proc.wait(timeout=30)


class DroppingHandler(http.server.SimpleHTTPRequestHandler):
    drops = 0
    served: ClassVar[collections.Counter] = collections.Counter()

    def copyfile(self, source: BinaryIO, outputfile: BinaryIO) -> None:
        self.served[self.path] += 1
        if self.path.endswith(".tar") and self.served[self.path] <= self.drops:
            data = source.read()  # Content-Length announced the whole file: the client sees a short body
            outputfile.write(data[:len(data) // 2])
            self.close_connection = True
            return
        super().copyfile(source, outputfile)


if __name__ == "__main__":
    folder, DroppingHandler.drops = sys.argv[1], int(sys.argv[2])
    handler = lambda *a, **kw: DroppingHandler(*a, directory=folder, **kw)  # noqa: E731
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        host, port = httpd.server_address[:2]
        print(f"Serving HTTP on {host} port {port} (http://{host}:{port}/) ...", flush=True)
        httpd.serve_forever()
