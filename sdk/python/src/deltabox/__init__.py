"""DeltaBox Python SDK: sandboxes with millisecond checkpoint, rollback and fork of files and live processes.

    from deltabox import Sandbox
    with Sandbox.create() as sbx:
        sbx.files.write("/app/app.py", "x = 1\\n")
        repl = sbx.sessions.start("python3")
        repl.run("import sys; sys.path.insert(0, '/app'); import app; data = list(range(10**6))")
        ck = sbx.checkpoint()
        sbx.commands.run("rm -rf /app")
        sbx.rollback(ck)                 # files and the REPL's `data` are back
        branches = sbx.fork(ck, n=8)     # 8 live sandboxes, each with its own future
"""

from .async_sandbox import AsyncSandbox, AsyncSession
from .errors import (
    AuthenticationError,
    ConflictError,
    DeltaBoxError,
    InvalidRequestError,
    NotFoundError,
    ServerError,
    TimeoutError,
)
from .models import (
    Checkpoint,
    CommandResult,
    Diff,
    EntryInfo,
    GcReport,
    ImportResult,
    RollbackResult,
    SandboxInfo,
    SessionResult,
)
from .sandbox import Sandbox, Session

__all__ = [
    "AsyncSandbox",
    "AsyncSession",
    "AuthenticationError",
    "Checkpoint",
    "CommandResult",
    "ConflictError",
    "Diff",
    "GcReport",
    "ImportResult",
    "DeltaBoxError",
    "EntryInfo",
    "InvalidRequestError",
    "NotFoundError",
    "RollbackResult",
    "Sandbox",
    "SandboxInfo",
    "ServerError",
    "Session",
    "SessionResult",
    "TimeoutError",
]
