"""Typed results (plain dataclasses built from the daemon's JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional


def _build(cls, data: Dict[str, Any]):
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in names}
    obj = cls(**kwargs)
    obj.raw = data
    return obj


@dataclass
class CommandResult:
    """A finished command (E2B's name). `exit_code` is None when a signal ended it."""

    stdout: str = ""
    stderr: str = ""
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    timed_out: bool = False
    oom_killed: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_ms: float = 0.0
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class SessionResult:
    """A command run in a session (the interpreter keeps its state between runs)."""

    stdout: str = ""
    stderr: str = ""
    exit_code: Optional[int] = None
    timed_out: bool = False
    session_alive: bool = True
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_ms: float = 0.0
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Checkpoint:
    """A checkpoint: the sandbox's files, and with `with_processes` its live processes too."""

    id: str = ""
    sandbox_id: str = ""
    parent: Optional[str] = None
    created_at: int = 0
    depth: int = 0
    with_processes: bool = False
    processes: List[int] = field(default_factory=list)
    durable: bool = False
    pinned: bool = False
    duration_ms: float = 0.0
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        return self.id


@dataclass
class RollbackResult:
    sandbox_id: str = ""
    checkpoint: str = ""
    processes_restarted: bool = False
    restored: List[int] = field(default_factory=list)
    note: str = ""
    duration_ms: float = 0.0
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class EntryInfo:
    """A file or directory (E2B's name)."""

    name: str = ""
    path: str = ""
    type: str = ""
    size: int = 0
    mode: int = 0
    modified: int = 0
    target: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class SandboxInfo:
    id: str = ""
    status: str = ""
    image: str = ""
    network: str = ""
    memory_bytes: Optional[int] = None
    pids: Optional[int] = None
    cpus: Optional[float] = None
    created_at: int = 0
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Diff:
    """Paths (as the sandbox sees them) added, deleted and changed from one checkpoint to another."""

    added: List[str] = field(default_factory=list)
    deleted: List[str] = field(default_factory=list)
    changed: List[str] = field(default_factory=list)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class GcReport:
    """What `gc` removed (or, with `dry_run`, would remove)."""

    dry_run: bool = False
    removed: List[Dict[str, Any]] = field(default_factory=list)
    kept: int = 0
    image_bytes: int = 0
    refused: List[str] = field(default_factory=list)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class ImportResult:
    """An imported checkpoint: a new stopped sandbox; roll it back to the checkpoint to start it."""

    sandbox_id: str = ""
    checkpoint: str = ""
    with_processes: bool = False
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


def build(cls, data):
    return _build(cls, data)
