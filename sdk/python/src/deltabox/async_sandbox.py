"""`AsyncSandbox`: the async twin of `Sandbox` (same names, awaited)."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Union

from . import _ops as ops
from . import models
from ._transport import AsyncApi
from .errors import DeltaBoxError, NotFoundError
from .sandbox import CheckpointRef, _kw


class AsyncCommands:
    def __init__(self, sbx: "AsyncSandbox"):
        self._sbx = sbx

    async def run(
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
        op = ops.run(self._sbx.sandbox_id, cmd, cwd, envs, timeout, stdin)
        if on_stdout is None and on_stderr is None:
            return await self._sbx._do(op)
        out: Dict[str, List[str]] = {"stdout": [], "stderr": []}
        async for line in self._sbx._api.stream_lines("POST", op.path + "/stream", json=op.json, timeout=op.timeout):
            res = ops.stream_event(line, out, on_stdout, on_stderr)
            if res is not None:
                return res
        raise DeltaBoxError("the output stream ended without the command's exit")


class AsyncFiles:
    def __init__(self, sbx: "AsyncSandbox"):
        self._sbx = sbx

    async def read(self, path: str, format: str = "text") -> Union[str, bytes]:  # noqa: A002
        return await self._sbx._do(ops.read(self._sbx.sandbox_id, path, format))

    async def write(self, path: str, data: Union[str, bytes], mode: Optional[int] = None) -> models.EntryInfo:
        return await self._sbx._do(ops.write(self._sbx.sandbox_id, path, data, mode))

    async def list(self, path: str) -> List[models.EntryInfo]:
        return await self._sbx._do(ops.list_dir(self._sbx.sandbox_id, path))

    async def get_info(self, path: str) -> models.EntryInfo:
        return await self._sbx._do(ops.stat(self._sbx.sandbox_id, path))

    async def exists(self, path: str) -> bool:
        try:
            await self.get_info(path)
            return True
        except NotFoundError:
            return False

    async def make_dir(self, path: str) -> models.EntryInfo:
        return await self._sbx._do(ops.make_dir(self._sbx.sandbox_id, path))

    async def remove(self, path: str) -> None:
        await self._sbx._do(ops.remove(self._sbx.sandbox_id, path))


class AsyncSession:
    def __init__(self, sbx: "AsyncSandbox", data: dict):
        self._sbx = sbx
        self.id: str = data["id"]
        self.kind: str = data.get("kind", "")
        self.pid: int = data.get("pid", 0)

    async def run(self, code: str, *, timeout: Optional[float] = None) -> models.SessionResult:
        return await self._sbx._do(ops.run_in_session(self._sbx.sandbox_id, self.id, code, timeout))

    async def kill(self) -> None:
        await self._sbx._do(ops.stop_session(self._sbx.sandbox_id, self.id))


class AsyncSessions:
    def __init__(self, sbx: "AsyncSandbox"):
        self._sbx = sbx

    async def start(self, kind: str = "bash", *, cwd: Optional[str] = None, envs: Optional[Dict[str, str]] = None) -> AsyncSession:
        return AsyncSession(self._sbx, await self._sbx._do(ops.start_session(self._sbx.sandbox_id, kind, cwd, envs)))

    async def list(self) -> List[AsyncSession]:
        return [AsyncSession(self._sbx, d) for d in await self._sbx._do(ops.list_sessions(self._sbx.sandbox_id))]


class AsyncSandbox:
    def __init__(self, api: AsyncApi, data: dict, *, owns_api: bool = True):
        self._api = api
        self._owns_api = owns_api
        self.sandbox_id: str = data["id"]
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self.sessions = AsyncSessions(self)

    async def _do(self, op: ops.Op):
        return op.convert(await self._api.call(**_kw(op)))

    @classmethod
    async def create(
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
    ) -> "AsyncSandbox":
        api = AsyncApi(socket, base_url, token, request_timeout)
        try:
            data = await api.call(**_kw(ops.create(image, memory, pids, cpus, network)))
        except BaseException:
            await api.close()
            raise
        return cls(api, data)

    @classmethod
    async def connect(cls, sandbox_id: str, *, socket=None, base_url=None, token=None, request_timeout: float = 60.0) -> "AsyncSandbox":
        api = AsyncApi(socket, base_url, token, request_timeout)
        try:
            data = await api.call(**_kw(ops.info(sandbox_id)))
        except BaseException:
            await api.close()
            raise
        return cls(api, data)

    async def get_info(self) -> models.SandboxInfo:
        return await self._do(ops.info(self.sandbox_id))

    async def pause(self) -> None:
        await self._do(ops.pause(self.sandbox_id))

    async def resume(self) -> None:
        await self._do(ops.resume(self.sandbox_id))

    async def kill(self) -> None:
        try:
            await self._do(ops.kill(self.sandbox_id))
        except NotFoundError:
            pass

    async def close(self) -> None:
        if self._owns_api:
            await self._api.close()

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            await self.kill()
        finally:
            await self.close()

    async def checkpoint(self, *, processes: bool = True) -> models.Checkpoint:
        return await self._do(ops.checkpoint(self.sandbox_id, processes))

    async def rollback(self, checkpoint: CheckpointRef, *, memory: str = "lazy") -> models.RollbackResult:
        return await self._do(ops.rollback(self.sandbox_id, checkpoint, memory))

    async def fork(self, checkpoint: CheckpointRef, n: int = 1) -> List["AsyncSandbox"]:
        return [AsyncSandbox(self._api, d, owns_api=False) for d in await self._do(ops.fork(checkpoint, n))]

    async def checkpoints(self) -> List[models.Checkpoint]:
        return await self._do(ops.checkpoints(self.sandbox_id))

    async def delete_checkpoint(self, checkpoint: CheckpointRef) -> None:
        await self._do(ops.delete_checkpoint(checkpoint))

    async def diff(self, a: CheckpointRef, b: CheckpointRef) -> models.Diff:
        return await self._do(ops.diff(a, b))

    async def pin(self, checkpoint: CheckpointRef) -> None:
        await self._do(ops.pin(checkpoint, True))

    async def unpin(self, checkpoint: CheckpointRef) -> None:
        await self._do(ops.pin(checkpoint, False))

    async def export(self, checkpoint: CheckpointRef, path: str, on_progress=None) -> dict:
        op = ops.archive(path, checkpoint)
        async for line in self._api.stream_lines(op.method, op.path, json=op.json, timeout=op.timeout):
            res = ops.archive_event(line, on_progress)
            if res is not None:
                return res
        raise DeltaBoxError("the export ended without a result")

    def __repr__(self) -> str:
        return f"AsyncSandbox(sandbox_id={self.sandbox_id!r})"
