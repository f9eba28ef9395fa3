"""`Sandbox`: a DeltaBox sandbox, E2B-style (`Sandbox.create()`, `sbx.commands.run()`, `sbx.files.write()`),
plus what E2B has not: millisecond `checkpoint()`, `rollback()` and `fork()` of files *and* live processes."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Union

from . import _ops as ops
from . import models
from ._transport import Api
from .errors import DeltaBoxError, NotFoundError

CheckpointRef = Union[str, models.Checkpoint]


class Commands:
    """One-shot commands (`sbx.commands`)."""

    def __init__(self, sbx: "Sandbox"):
        self._sbx = sbx

    def run(
        self,
        cmd: Union[str, Sequence[str]],
        *,
        cwd: Optional[str] = None,
        envs: Optional[Dict[str, str]] = None,
        timeout: Optional[float] = None,
        stdin: Optional[str] = None,
        on_stdout: Optional[Callable[[str], None]] = None,
        on_stderr: Optional[Callable[[str], None]] = None,
    ) -> models.CommandResult:
        """Runs `cmd` (a shell command line, or an argv list) to completion. A non-zero exit is a result, not an
        error: check `exit_code`. `timeout` in seconds. With `on_stdout`/`on_stderr`, output is streamed to them
        as it comes (and still collected in the result)."""
        op = ops.run(self._sbx.sandbox_id, cmd, cwd, envs, timeout, stdin)
        if on_stdout is None and on_stderr is None:
            return self._sbx._do(op)
        out: Dict[str, List[str]] = {"stdout": [], "stderr": []}
        for line in self._sbx._api.stream_lines("POST", op.path + "/stream", json=op.json, timeout=op.timeout):
            res = ops.stream_event(line, out, on_stdout, on_stderr)
            if res is not None:
                return res
        raise DeltaBoxError("the output stream ended without the command's exit")


class Files:
    """The sandbox's files, as its processes see them (`sbx.files`)."""

    def __init__(self, sbx: "Sandbox"):
        self._sbx = sbx

    def read(self, path: str, format: str = "text") -> Union[str, bytes]:  # noqa: A002 - E2B's name
        return self._sbx._do(ops.read(self._sbx.sandbox_id, path, format))

    def write(self, path: str, data: Union[str, bytes], mode: Optional[int] = None) -> models.EntryInfo:
        """Writes a file (parent directories made as needed); `mode` like `0o755`."""
        return self._sbx._do(ops.write(self._sbx.sandbox_id, path, data, mode))

    def list(self, path: str) -> List[models.EntryInfo]:
        return self._sbx._do(ops.list_dir(self._sbx.sandbox_id, path))

    def get_info(self, path: str) -> models.EntryInfo:
        return self._sbx._do(ops.stat(self._sbx.sandbox_id, path))

    def exists(self, path: str) -> bool:
        try:
            self.get_info(path)
            return True
        except NotFoundError:
            return False

    def make_dir(self, path: str) -> models.EntryInfo:
        return self._sbx._do(ops.make_dir(self._sbx.sandbox_id, path))

    def remove(self, path: str) -> None:
        """Removes a file, a link, or a directory with everything in it."""
        self._sbx._do(ops.remove(self._sbx.sandbox_id, path))


class Session:
    """A long-lived interpreter (bash or python3) whose state persists between runs, and is checkpointed,
    rolled back and forked with the sandbox."""

    def __init__(self, sbx: "Sandbox", data: dict):
        self._sbx = sbx
        self.id: str = data["id"]
        self.kind: str = data.get("kind", "")
        self.pid: int = data.get("pid", 0)

    def run(self, code: str, *, timeout: Optional[float] = None) -> models.SessionResult:
        return self._sbx._do(ops.run_in_session(self._sbx.sandbox_id, self.id, code, timeout))

    def kill(self) -> None:
        self._sbx._do(ops.stop_session(self._sbx.sandbox_id, self.id))

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, kind={self.kind!r})"


class Sessions:
    """`sbx.sessions`."""

    def __init__(self, sbx: "Sandbox"):
        self._sbx = sbx

    def start(self, kind: str = "bash", *, cwd: Optional[str] = None, envs: Optional[Dict[str, str]] = None) -> Session:
        return Session(self._sbx, self._sbx._do(ops.start_session(self._sbx.sandbox_id, kind, cwd, envs)))

    def list(self) -> List[Session]:
        return [Session(self._sbx, d) for d in self._sbx._do(ops.list_sessions(self._sbx.sandbox_id))]

    def get(self, session_id: str) -> Session:
        for s in self.list():
            if s.id == session_id:
                return s
        raise NotFoundError(f"no session {session_id!r}", code="not_found", status=404)


class Sandbox:
    """A sandbox. Use as a context manager to remove it at the end."""

    def __init__(self, api: Api, data: dict, *, owns_api: bool = True):
        self._api = api
        self._owns_api = owns_api
        self.sandbox_id: str = data["id"]
        self.commands = Commands(self)
        self.files = Files(self)
        self.sessions = Sessions(self)

    def _do(self, op: ops.Op):
        return op.convert(
            self._api.call(
                op.method, op.path, json=op.json, params=op.params, content=op.content, raw=op.raw, timeout=op.timeout
            )
        )

    # Lifecycle -----------------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        image: Optional[str] = None,
        *,
        memory: Optional[str] = None,
        pids: Optional[int] = None,
        cpus: Optional[float] = None,
        network: Optional[str] = None,
        socket: Optional[str] = None,
        base_url: Optional[str] = None,
        token: Optional[str] = None,
        request_timeout: float = 60.0,
    ) -> "Sandbox":
        """A new sandbox (`image`: the daemon's default when None; `memory` like "1G")."""
        api = Api(socket, base_url, token, request_timeout)
        try:
            data = api.call(**_kw(ops.create(image, memory, pids, cpus, network)))
        except BaseException:
            api.close()
            raise
        return cls(api, data)

    @classmethod
    def connect(cls, sandbox_id: str, *, socket=None, base_url=None, token=None, request_timeout: float = 60.0) -> "Sandbox":
        api = Api(socket, base_url, token, request_timeout)
        try:
            data = api.call(**_kw(ops.info(sandbox_id)))
        except BaseException:
            api.close()
            raise
        return cls(api, data)

    @staticmethod
    def list(*, socket=None, base_url=None, token=None) -> List[models.SandboxInfo]:
        api = Api(socket, base_url, token)
        try:
            op = ops.list_sandboxes()
            return op.convert(api.call(**_kw(op)))
        finally:
            api.close()

    def get_info(self) -> models.SandboxInfo:
        return self._do(ops.info(self.sandbox_id))

    def is_running(self) -> bool:
        return self.get_info().status == "running"

    def pause(self) -> None:
        self._do(ops.pause(self.sandbox_id))

    def resume(self) -> None:
        self._do(ops.resume(self.sandbox_id))

    def kill(self) -> None:
        """Removes the sandbox (its processes, files and checkpoints)."""
        try:
            self._do(ops.kill(self.sandbox_id))
        except NotFoundError:
            pass

    def close(self) -> None:
        """Closes the connection (the sandbox stays)."""
        if self._owns_api:
            self._api.close()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.kill()
        finally:
            self.close()

    # Checkpoint, rollback, fork ------------------------------------------------------------------------------

    def checkpoint(self, *, processes: bool = True) -> models.Checkpoint:
        """Checkpoints the files and (by default) every live process: sessions, servers, background jobs."""
        return self._do(ops.checkpoint(self.sandbox_id, processes))

    def rollback(self, checkpoint: CheckpointRef, *, memory: str = "lazy") -> models.RollbackResult:
        """Back to `checkpoint`: files, and its processes with their pids and memory. `memory="eager"` fills
        a process restored from its durable image before it runs (only matters when its template is gone)."""
        return self._do(ops.rollback(self.sandbox_id, checkpoint, memory))

    def fork(self, checkpoint: CheckpointRef, n: int = 1) -> List["Sandbox"]:
        """`n` new sandboxes that go on from `checkpoint` (its live processes included), each on its own: one
        atomic call. They share this sandbox's connection."""
        return [Sandbox(self._api, d, owns_api=False) for d in self._do(ops.fork(checkpoint, n))]

    def checkpoints(self) -> List[models.Checkpoint]:
        return self._do(ops.checkpoints(self.sandbox_id))

    def delete_checkpoint(self, checkpoint: CheckpointRef) -> None:
        self._do(ops.delete_checkpoint(checkpoint))

    def pin(self, checkpoint: CheckpointRef) -> None:
        self._do(ops.pin(checkpoint, True))

    def unpin(self, checkpoint: CheckpointRef) -> None:
        self._do(ops.pin(checkpoint, False))

    def diff(self, a: CheckpointRef, b: CheckpointRef) -> models.Diff:
        """What changed in the files from checkpoint `a` to checkpoint `b`."""
        return self._do(ops.diff(a, b))

    def export(self, checkpoint: CheckpointRef, path: str, on_progress: Optional[Callable[[int, int], None]] = None) -> dict:
        """Writes `checkpoint` (files, process images, settings) as an archive at `path` on the daemon's machine."""
        op = ops.archive(path, checkpoint)
        for line in self._api.stream_lines(op.method, op.path, json=op.json, timeout=op.timeout):
            res = ops.archive_event(line, on_progress)
            if res is not None:
                return res
        raise DeltaBoxError("the export ended without a result")

    @staticmethod
    def import_archive(path: str, *, on_progress=None, socket=None, base_url=None, token=None) -> models.ImportResult:
        """Recreates an exported checkpoint from `path` (on the daemon's machine) as a new, stopped sandbox."""
        api = Api(socket, base_url, token)
        try:
            op = ops.archive(path)
            for line in api.stream_lines(op.method, op.path, json=op.json, timeout=op.timeout):
                res = ops.archive_event(line, on_progress)
                if res is not None:
                    return models.build(models.ImportResult, res)
            raise DeltaBoxError("the import ended without a result")
        finally:
            api.close()

    @staticmethod
    def gc(*, dry_run: bool = False, socket=None, base_url=None, token=None) -> models.GcReport:
        """Deletes every checkpoint nothing keeps (pinned ones, sandbox heads and their ancestors stay)."""
        api = Api(socket, base_url, token)
        try:
            op = ops.gc(dry_run)
            return op.convert(api.call(**_kw(op)))
        finally:
            api.close()

    def __repr__(self) -> str:
        return f"Sandbox(sandbox_id={self.sandbox_id!r})"


def _kw(op: ops.Op) -> dict:
    return dict(method=op.method, path=op.path, json=op.json, params=op.params, content=op.content, raw=op.raw, timeout=op.timeout)
