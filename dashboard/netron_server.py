"""One local Netron server per model file, shared by every rerun and session of the process.

Streamlit re-executes the page script on every interaction; starting a server there would
leak one HTTP server per click. The registry below lives at module level (imported once per
process), is keyed by (real path, inode, mtime, ctime, size) so a rewritten file gets a fresh
server, and stops the server of a file's previous version when that happens.

Every served file lives in its session's private folder, so two sessions never share a
server, even for files of the same name. Servers bind to 127.0.0.1 only.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import netron
import netron.server as _netron_server

HOST = "127.0.0.1"


@dataclass(frozen=True)
class NetronServer:
    path: str
    address: tuple[str, int]

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}/"


_lock = threading.Lock()
_servers: dict[tuple[str, int, int, int, int], NetronServer] = {}


def _key(path: str | Path) -> tuple[str, int, int, int, int]:
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size


def serve(path: str | Path) -> NetronServer:
    """Return the running Netron server for ``path``, starting it on first use."""
    key = _key(path)
    with _lock:
        server = _servers.get(key)
        if server is not None and netron.status(server.address):
            return server
        # A new version of the same file replaces the old server instead of piling up.
        for old_key in [k for k in _servers if k[0] == key[0]]:
            netron.stop(_servers.pop(old_key).address)
        # Port 0: netron asks the OS for a free port, bound to loopback only.
        address = netron.start(key[0], address=(HOST, 0), browse=False)
        _pin_content(address)
        server = NetronServer(path=key[0], address=(str(address[0]), int(address[1])))
        _servers[key] = server
        return server


def _pin_content(address: tuple[str, int]) -> None:
    """Give the server just started its own copy of the file it serves.

    netron 9.3.3 stores the served file on its request-handler *class*, shared by every
    server of the process, so each new server would make all the older ones serve the newest
    file (the "original" frame would show the pruned model). A per-server subclass keeps each
    server's content; called under ``_lock`` right after ``netron.start``, before any request.
    """
    handler = _netron_server._HTTPRequestHandler
    for thread in _netron_server._threads(address):
        own = type("PinnedNetronHandler", (handler,), {"content": handler.content})
        thread.server.RequestHandlerClass = own


def running() -> list[NetronServer]:
    """Servers of this process that are still alive."""
    with _lock:
        return [s for s in _servers.values() if netron.status(s.address)]


def stop(path: str | Path | None = None) -> None:
    """Stop the server of one file (any version), or all of them."""
    real = os.path.realpath(path) if path is not None else None
    with _lock:
        for key in [k for k in _servers if real is None or k[0] == real]:
            netron.stop(_servers.pop(key).address)


def stop_under(folder: str | Path) -> int:
    """Stop the servers of every file inside ``folder`` (a closed session's folder)."""
    base = os.path.realpath(folder)
    with _lock:
        keys = [k for k in _servers if os.path.commonpath([base, k[0]]) == base]
        for key in keys:
            netron.stop(_servers.pop(key).address)
    return len(keys)
