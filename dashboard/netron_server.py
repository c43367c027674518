"""One local Netron server per model file, shared by every rerun and session of the process.

Streamlit re-executes the page script on every interaction; starting a server there would
leak one HTTP server per click. The registry below lives at module level (imported once per
process), is keyed by (real path, inode, mtime, ctime, size) so a rewritten file gets a fresh
server, and stops the server of a file's previous version when that happens.

Every served file lives in its session's private folder, so two sessions never share a
server, even for files of the same name. Servers bind to 127.0.0.1 only.

Private by default: netron's web page asks an IP-lookup service (ipinfo.io) where the user
is, shows a cookie banner and, once accepted, reports usage to an analytics collector; after
180 days it blocks with "Please update". Our servers serve netron 9.3.3's own files with
those start-up steps cut out of ``browser.js`` (`PRIVACY_PATCHES`), a Content-Security-Policy
that lets the page load and fetch from its own server only, and the few glyphs netron draws
from fonts a bare machine may lack (menu, back and save buttons) replaced by plain ones.
"""

from __future__ import annotations

import functools
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
    for name in PATCHED_FILES:
        patched_file(name)  # a netron we cannot make private is refused before serving
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


# Only the page's own server: no outside script, style, font, image, fetch or beacon.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self'; connect-src 'self'; worker-src 'self' blob:; "
    "frame-src 'none'; object-src 'none'; form-action 'none'; base-uri 'self'"
)

_MENU_ICON = ('<svg width="16" height="14" viewBox="0 0 16 14" fill="currentColor">'
              '<rect y="1" width="16" height="2"/><rect y="6" width="16" height="2"/>'
              '<rect y="11" width="16" height="2"/></svg>')

# (file, text in netron 9.3.3, replacement; every occurrence). Each must be found: a netron
# upgrade that moves one fails loudly (PrivacyPatchError) instead of serving a page that
# calls out.
PRIVACY_PATCHES: tuple[tuple[str, str, str], ...] = (
    # start-up: no "Please update" wall, no IP lookup, no cookie banner, no analytics
    ("browser.js",
     "        await age();\n        await consent();\n        await telemetry();\n",
     ""),
    # glyphs that are boxes without a symbol/emoji font: menu (≡), back (❮), submenu (❯),
    # loading (hourglass emoji) and save (floppy emoji)
    ("index.html", '<div id="menu-button" class="menu-button">&#8801;</div>',
     f'<div id="menu-button" class="menu-button">{_MENU_ICON}</div>'),
    ("index.html", "            &#x276E;\n", "            &lsaquo;\n"),
    ("view.js", "accelerator.innerHTML = '&#10095;';", "accelerator.innerHTML = '&rsaquo;';"),
    ("view.js", "content.innerHTML = '&#x23F3';", "content.innerHTML = '&hellip;';"),
    ("view.js", "this._saveButton.innerHTML = '&#x1F4BE;';",
     "this._saveButton.innerHTML = 'Save';"),
    # tensor shapes in the graph's nodes are wrapped in CJK angle brackets (U+3008/9)
    ("view.js", "\\u3008", "<"),
    ("view.js", "\\u3009", ">"),
)


PATCHED_FILES = tuple(sorted({file for file, _, _ in PRIVACY_PATCHES}))


class PrivacyPatchError(RuntimeError):
    """The installed netron is not the one whose start-up steps we know how to cut out."""


@functools.cache
def patched_file(name: str) -> bytes | None:
    """netron's ``name`` with our patches applied; None for a file we do not patch."""
    patches = [(old, new) for file, old, new in PRIVACY_PATCHES if file == name]
    if not patches:
        return None
    text = (Path(netron.__file__).parent / name).read_text(encoding="utf-8")
    for old, new in patches:
        if old not in text:
            raise PrivacyPatchError(
                f"netron {getattr(netron, '__version__', '?')}: {name} no longer contains "
                f"{old.strip()[:60]!r}; the dashboard pins netron==9.3.3")
        text = text.replace(old, new)
    return text.encode("utf-8")


class PrivateNetronHandler(_netron_server._HTTPRequestHandler):
    """netron's request handler, serving the patched files and a strict CSP header."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        name = "index.html" if path in ("", "/") else path.lstrip("/")
        if name in ("browser.js", "view.js"):
            self._write(200, self.mime_types[".js"], patched_file(name))
            return
        if name == "index.html":
            # netron's own handler adds the per-file <meta> tags; patch its answer
            self._patch_next_write = True
        super().do_GET()

    def _write(self, status_code: int, content_type: str | None, content: bytes | None) -> None:
        if getattr(self, "_patch_next_write", False) and content is not None:
            self._patch_next_write = False
            text = content.decode("utf-8")
            for file, old, new in PRIVACY_PATCHES:
                if file == "index.html":  # checked by patched_file("index.html") in serve()
                    text = text.replace(old, new)
            content = text.encode("utf-8")
        super()._write(status_code, content_type, content)

    def end_headers(self) -> None:
        self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.send_header("Referrer-Policy", "no-referrer")
        super().end_headers()


def _pin_content(address: tuple[str, int]) -> None:
    """Give the server just started its own copy of the file it serves, and our handler.

    netron 9.3.3 stores the served file on its request-handler *class*, shared by every
    server of the process, so each new server would make all the older ones serve the newest
    file (the "original" frame would show the pruned model). A per-server subclass of
    `PrivateNetronHandler` keeps each server's content; called under ``_lock`` right after
    ``netron.start``, before any request.
    """
    content = _netron_server._HTTPRequestHandler.content
    for thread in _netron_server._threads(address):
        own = type("PinnedNetronHandler", (PrivateNetronHandler,), {"content": content})
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
