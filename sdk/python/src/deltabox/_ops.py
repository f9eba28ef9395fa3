"""Every API call as data (method, path, body, how to read the answer), shared by the sync and async clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union
from urllib.parse import quote

from . import models
from ._transport import SLACK

Identity = Callable[[Any], Any]


@dataclass
class Op:
    method: str
    path: str
    json: Any = None
    params: Optional[Dict[str, str]] = None
    content: Optional[bytes] = None
    raw: bool = False
    timeout: Optional[float] = None
    convert: Identity = lambda x: x


def _seg(s: str) -> str:
    return quote(str(s), safe="")


def _ms(seconds: Optional[float]) -> Optional[int]:
    return None if seconds is None else int(seconds * 1000)


def _http_timeout(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds + SLACK


def create(image, memory, pids, cpus, network) -> Op:
    body = {k: v for k, v in dict(image=image, memory=memory, pids=pids, cpus=cpus, network=network).items() if v is not None}
    return Op("POST", "/v1/sandboxes", json=body)


def info(sid: str) -> Op:
    return Op("GET", f"/v1/sandboxes/{_seg(sid)}", convert=lambda d: models.build(models.SandboxInfo, d))


def list_sandboxes() -> Op:
    return Op("GET", "/v1/sandboxes", convert=lambda l: [models.build(models.SandboxInfo, d) for d in l])


def kill(sid: str) -> Op:
    return Op("DELETE", f"/v1/sandboxes/{_seg(sid)}")


def pause(sid: str) -> Op:
    return Op("POST", f"/v1/sandboxes/{_seg(sid)}/pause")


def resume(sid: str) -> Op:
    return Op("POST", f"/v1/sandboxes/{_seg(sid)}/resume")


def _checkpoint(sid: str):
    def conv(d):
        c = models.build(models.Checkpoint, d)
        c.sandbox_id = c.sandbox_id or sid
        return c

    return conv


def checkpoint(sid: str, processes: bool) -> Op:
    return Op("POST", f"/v1/sandboxes/{_seg(sid)}/checkpoints", json={"processes": processes}, convert=_checkpoint(sid))


def checkpoints(sid: str) -> Op:
    conv = _checkpoint(sid)
    return Op("GET", f"/v1/sandboxes/{_seg(sid)}/checkpoints", convert=lambda l: [conv(d) for d in l])


def _cid(checkpoint: Union[str, "models.Checkpoint"]) -> str:
    return checkpoint.id if isinstance(checkpoint, models.Checkpoint) else str(checkpoint)


def rollback(sid: str, checkpoint, memory: str) -> Op:
    return Op(
        "POST",
        f"/v1/sandboxes/{_seg(sid)}/rollback",
        json={"checkpoint": _cid(checkpoint), "memory": memory},
        convert=lambda d: models.build(models.RollbackResult, d),
    )


def fork(checkpoint, n: int) -> Op:
    return Op("POST", f"/v1/checkpoints/{_seg(_cid(checkpoint))}/fork", json={"n": n}, timeout=300)


def delete_checkpoint(checkpoint) -> Op:
    return Op("DELETE", f"/v1/checkpoints/{_seg(_cid(checkpoint))}")


def pin(checkpoint, on: bool) -> Op:
    return Op("POST" if on else "DELETE", f"/v1/checkpoints/{_seg(_cid(checkpoint))}/pin")


def diff(a, b) -> Op:
    return Op(
        "GET",
        f"/v1/checkpoints/{_seg(_cid(a))}/diff/{_seg(_cid(b))}",
        convert=lambda d: models.build(models.Diff, d),
    )


def gc(dry_run: bool) -> Op:
    return Op("POST", "/v1/gc", json={"dry_run": dry_run}, timeout=600, convert=lambda d: models.build(models.GcReport, d))


def archive(path: str, checkpoint=None) -> Op:
    """Export (with a checkpoint) or import: NDJSON progress lines, then `{"result": …}` or `{"error": …}`."""
    target = f"/v1/checkpoints/{_seg(_cid(checkpoint))}/export" if checkpoint is not None else "/v1/import"
    return Op("POST", target, json={"path": path}, timeout=3600)


def archive_event(line: str, on_progress):
    """One line of an export/import stream: the final result (a dict), or None after a progress report."""
    import json as _json

    from .errors import DeltaBoxError

    ev = _json.loads(line)
    if "progress" in ev:
        if on_progress is not None:
            on_progress(ev["progress"].get("done", 0), ev["progress"].get("total", 0))
        return None
    if "error" in ev:
        raise DeltaBoxError(ev["error"].get("message", "failed"), code=ev["error"].get("code"))
    return ev.get("result", {})


def run(sid: str, cmd: Union[str, Sequence[str]], cwd, envs, timeout, stdin) -> Op:
    argv: List[str] = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    body: Dict[str, Any] = {"argv": argv}
    if cwd is not None:
        body["cwd"] = cwd
    if envs:
        body["env"] = dict(envs)
    if stdin is not None:
        body["stdin"] = stdin
    if timeout is not None:
        body["timeout_ms"] = _ms(timeout)
    return Op(
        "POST",
        f"/v1/sandboxes/{_seg(sid)}/exec",
        json=body,
        timeout=_http_timeout(timeout),
        convert=lambda d: models.build(models.CommandResult, d),
    )


def stream_event(line: str, out: Dict[str, List[str]], on_stdout, on_stderr):
    """Handles one NDJSON line of `/exec/stream`; returns the CommandResult at the end, else None."""
    import base64
    import json as _json

    from .errors import DeltaBoxError

    ev = _json.loads(line)
    kind = ev.get("type")
    if kind in ("stdout", "stderr"):
        text = base64.b64decode(ev.get("data", "")).decode("utf-8", "replace")
        out[kind].append(text)
        cb = on_stdout if kind == "stdout" else on_stderr
        if cb is not None:
            cb(text)
        return None
    if kind == "exit":
        res = models.build(models.CommandResult, ev)
        res.stdout, res.stderr = "".join(out["stdout"]), "".join(out["stderr"])
        return res
    if kind == "error":
        raise DeltaBoxError(ev.get("message", "command failed"), code=ev.get("code"))
    return None


def start_session(sid: str, kind: str, cwd, envs) -> Op:
    body: Dict[str, Any] = {"kind": kind}
    if cwd is not None:
        body["cwd"] = cwd
    if envs:
        body["env"] = dict(envs)
    return Op("POST", f"/v1/sandboxes/{_seg(sid)}/sessions", json=body)


def list_sessions(sid: str) -> Op:
    return Op("GET", f"/v1/sandboxes/{_seg(sid)}/sessions")


def run_in_session(sid: str, session: str, code: str, timeout) -> Op:
    body: Dict[str, Any] = {"command": code}
    if timeout is not None:
        body["timeout_ms"] = _ms(timeout)
    return Op(
        "POST",
        f"/v1/sandboxes/{_seg(sid)}/sessions/{_seg(session)}/run",
        json=body,
        timeout=_http_timeout(timeout),
        convert=lambda d: models.build(models.SessionResult, d),
    )


def stop_session(sid: str, session: str) -> Op:
    return Op("DELETE", f"/v1/sandboxes/{_seg(sid)}/sessions/{_seg(session)}")


def _files(sid: str, suffix: str = "") -> str:
    return f"/v1/sandboxes/{_seg(sid)}/files{suffix}"


def _entry(d):
    return models.build(models.EntryInfo, d)


def read(sid: str, path: str, fmt: str) -> Op:
    if fmt not in ("text", "bytes"):
        raise ValueError("format is 'text' or 'bytes'")
    return Op(
        "GET",
        _files(sid),
        params={"path": path},
        raw=True,
        convert=(lambda b: b.decode()) if fmt == "text" else (lambda b: b),
    )


def write(sid: str, path: str, data: Union[str, bytes], mode: Optional[int]) -> Op:
    params = {"path": path}
    if mode is not None:
        params["mode"] = format(mode, "o")
    content = data.encode() if isinstance(data, str) else bytes(data)
    return Op("PUT", _files(sid), params=params, content=content, convert=_entry)


def list_dir(sid: str, path: str) -> Op:
    return Op("GET", _files(sid, "/list"), params={"path": path}, convert=lambda l: [_entry(d) for d in l])


def stat(sid: str, path: str) -> Op:
    return Op("GET", _files(sid, "/stat"), params={"path": path}, convert=_entry)


def make_dir(sid: str, path: str) -> Op:
    return Op("POST", _files(sid, "/mkdir"), params={"path": path}, convert=_entry)


def remove(sid: str, path: str) -> Op:
    return Op("DELETE", _files(sid), params={"path": path})
