"""HTTP to the daemon: its Unix socket by default, TCP with a bearer token when asked."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

import httpx

from .errors import DeltaBoxError, TimeoutError, from_response

DEFAULT_SOCKET = "/run/deltabox/deltabox.sock"
#: Extra seconds an HTTP request may take beyond the command's own timeout.
SLACK = 30.0


def _settings(socket: Optional[str], base_url: Optional[str], token: Optional[str]):
    base_url = base_url or os.environ.get("DELTABOX_URL")
    token = token or os.environ.get("DELTABOX_TOKEN")
    socket = socket or os.environ.get("DELTABOX_SOCKET") or DEFAULT_SOCKET
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return socket, base_url, headers


def autostart(socket: Optional[str]) -> bool:
    """Starts the local daemon the way the CLI does (`deltabox ls` starts one if none listens), when the
    `deltabox` binary is on PATH (or named by DELTABOX_BIN). Returns whether it ran."""
    import shutil
    import subprocess

    binary = os.environ.get("DELTABOX_BIN") or shutil.which("deltabox")
    if not binary:
        return False
    env = dict(os.environ)
    if socket:
        env["DELTABOX_SOCKET"] = socket
    r = subprocess.run([binary, "ls"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    return r.returncode == 0


@contextlib.contextmanager
def _transport_errors(method: str, path: str):
    """httpx's failures as ours (sync and async code alike: the block may await)."""
    try:
        yield
    except httpx.TimeoutException as e:
        raise TimeoutError(f"{method} {path}: {e}") from e
    except httpx.HTTPError as e:
        raise DeltaBoxError(f"cannot reach the DeltaBox daemon: {e}") from e


def _check(r: httpx.Response, raw: bool) -> Any:
    if r.status_code >= 400:
        try:
            body: Any = r.json()
        except ValueError:
            body = r.text
        raise from_response(r.status_code, body)
    if raw:
        return r.content
    if r.status_code == 204 or not r.content:
        return None
    return r.json()


class Api:
    """Synchronous calls."""

    def __init__(self, socket=None, base_url=None, token=None, timeout: float = 60.0):
        socket, base_url, headers = _settings(socket, base_url, token)
        if not base_url and not os.path.exists(socket):
            autostart(socket)
        transport = None if base_url else httpx.HTTPTransport(uds=socket)
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=base_url or "http://deltabox", transport=transport, headers=headers, timeout=timeout
        )

    def call(self, method: str, path: str, *, json=None, params=None, content=None, raw=False, timeout=None):
        with _transport_errors(method, path):
            r = self._http.request(
                method, path, json=json, params=params, content=content, timeout=timeout or self.timeout
            )
        return _check(r, raw)

    def stream_lines(self, method: str, path: str, *, json=None, timeout=None):
        """The response's lines as they come (NDJSON endpoints)."""
        with _transport_errors(method, path):
            with self._http.stream(method, path, json=json, timeout=timeout or self.timeout) as r:
                if r.status_code >= 400:
                    r.read()
                    _check(r, False)
                for line in r.iter_lines():
                    if line:
                        yield line

    def close(self) -> None:
        self._http.close()


class AsyncApi:
    """Asynchronous calls (the same, awaited)."""

    def __init__(self, socket=None, base_url=None, token=None, timeout: float = 60.0):
        socket, base_url, headers = _settings(socket, base_url, token)
        if not base_url and not os.path.exists(socket):
            autostart(socket)
        transport = None if base_url else httpx.AsyncHTTPTransport(uds=socket)
        self.timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=base_url or "http://deltabox", transport=transport, headers=headers, timeout=timeout
        )

    async def call(self, method: str, path: str, *, json=None, params=None, content=None, raw=False, timeout=None):
        with _transport_errors(method, path):
            r = await self._http.request(
                method, path, json=json, params=params, content=content, timeout=timeout or self.timeout
            )
        return _check(r, raw)

    async def stream_lines(self, method: str, path: str, *, json=None, timeout=None):
        with _transport_errors(method, path):
            async with self._http.stream(method, path, json=json, timeout=timeout or self.timeout) as r:
                if r.status_code >= 400:
                    await r.aread()
                    _check(r, False)
                async for line in r.aiter_lines():
                    if line:
                        yield line

    async def close(self) -> None:
        await self._http.aclose()
