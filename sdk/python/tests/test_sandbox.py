"""The SDK against a real daemon: the README's example, files, commands, sessions, checkpoint/rollback/fork,
typed errors, and the async twin."""

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from deltabox import (
    AsyncSandbox,
    Checkpoint,
    CommandResult,
    ConflictError,
    DeltaBoxError,
    InvalidRequestError,
    NotFoundError,
    Sandbox,
)

ROOT = Path(__file__).resolve().parents[3]


def test_the_readme_example_files_and_a_live_repl_come_back_and_fork(daemon):
    with Sandbox.create() as sbx:
        sbx.files.write("/app/app.py", "x = 1\n")
        repl = sbx.sessions.start("python3")
        r = repl.run("import sys; sys.path.insert(0, '/app'); import app; data = list(range(10**6))")
        assert r.exit_code == 0, r
        ck = sbx.checkpoint()
        assert isinstance(ck, Checkpoint) and ck.with_processes
        gone = sbx.commands.run("rm -rf /app && ls /app")
        assert gone.exit_code != 0
        rb = sbx.rollback(ck)
        assert not rb.processes_restarted, rb
        assert sbx.files.read("/app/app.py") == "x = 1\n"
        assert repl.run("print(app.x, len(data), sum(data))").stdout == "1 1000000 499999500000\n"
        branches = sbx.fork(ck, n=3)
        try:
            assert len(branches) == 3
            for i, b in enumerate(branches):
                b.files.write("/app/branch.txt", str(i))
                s = b.sessions.get(repl.id)
                assert s.run(f"data.append({i}); print(len(data), data[-1])").stdout == f"1000001 {i}\n"
            # Each branch has its own future; the source is untouched.
            assert [b.files.read("/app/branch.txt") for b in branches] == ["0", "1", "2"]
            assert not sbx.files.exists("/app/branch.txt")
            assert repl.run("print(len(data))").stdout == "1000000\n"
        finally:
            for b in branches:
                b.kill()


def test_commands_files_and_bytes(daemon):
    with Sandbox.create() as sbx:
        r = sbx.commands.run("echo out; echo err >&2; exit 3")
        assert isinstance(r, CommandResult)
        assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 3)
        r = sbx.commands.run(["printenv", "GREETING"], envs={"GREETING": "hi"}, cwd="/tmp")
        assert r.stdout == "hi\n"
        assert sbx.commands.run("cat", stdin="piped").stdout == "piped"
        r = sbx.commands.run("sleep 5", timeout=0.3)
        assert r.timed_out
        # Streamed: each chunk as it comes, and the whole in the result.
        seen = []
        r = sbx.commands.run("for i in 1 2 3; do echo $i; sleep 0.05; done; echo oops >&2; exit 4",
                             on_stdout=seen.append, on_stderr=seen.append)
        assert "".join(seen).replace("oops\n", "") == "1\n2\n3\n" and "oops\n" in seen
        assert (r.stdout, r.stderr, r.exit_code) == ("1\n2\n3\n", "oops\n", 4)
        info = sbx.files.write("/w/bin.dat", b"\x00\xffabc", mode=0o600)
        assert (info.type, info.size, info.mode) == ("file", 5, 0o600)
        assert sbx.files.read("/w/bin.dat", format="bytes") == b"\x00\xffabc"
        sbx.files.make_dir("/w/sub/dir")
        assert [(e.name, e.type) for e in sbx.files.list("/w")] == [("bin.dat", "file"), ("sub", "dir")]
        assert sbx.files.get_info("/w/sub").type == "dir"
        sbx.files.remove("/w")
        assert not sbx.files.exists("/w")


def test_the_checkpoint_tree_diff_pin_gc_export_and_import(daemon, tmp_path):
    with Sandbox.create() as sbx:
        sbx.files.write("/w/a", "1")
        c1 = sbx.checkpoint(processes=False)
        sbx.files.write("/w/b", "2")
        sbx.files.write("/w/a", "changed")
        c2 = sbx.checkpoint(processes=False)
        d = sbx.diff(c1, c2)
        assert (d.added, d.changed, d.deleted) == (["/w/b"], ["/w/a"], [])
        assert [c.id for c in sbx.checkpoints()] == [c1.id, c2.id]
        assert sbx.checkpoints()[1].parent == c1.id
        sbx.pin(c1)
        report = Sandbox.gc(dry_run=True)
        assert report.dry_run and c1.id not in [e["id"] for e in report.removed]
        archive = str(tmp_path / "c2.tar.gz")
        seen = []
        result = sbx.export(c2, archive, on_progress=lambda done, total: seen.append((done, total)))
        assert seen and seen[-1][0] == seen[-1][1]
        imported = Sandbox.import_archive(archive)
        assert imported.checkpoint and imported.sandbox_id != sbx.sandbox_id
        other = Sandbox.connect(imported.sandbox_id)
        try:
            other.rollback(imported.checkpoint)
            assert other.files.read("/w/a") == "changed"
        finally:
            other.kill()
            other.close()
        sbx.unpin(c1)


def test_errors_are_typed_and_carry_the_daemons_code(daemon):
    with Sandbox.create() as sbx:
        with pytest.raises(NotFoundError) as e:
            sbx.files.read("/no/such/file")
        assert e.value.code == "file_not_found" and e.value.status == 404
        with pytest.raises(InvalidRequestError) as e:
            sbx.files.read("/../etc/passwd")
        assert e.value.code == "invalid_path"
        with pytest.raises(NotFoundError):
            sbx.rollback("c-000000000000")
        with pytest.raises(InvalidRequestError):
            sbx.fork(sbx.checkpoint(), n=0)
        with pytest.raises(InvalidRequestError):
            sbx.fork(sbx.checkpoint(processes=False), n=10_000)
        sbx.pause()
        with pytest.raises(ConflictError) as e:
            sbx.commands.run("true")
        assert e.value.code == "sandbox_paused"
        sbx.resume()
        assert sbx.commands.run("echo back").stdout == "back\n"
    with pytest.raises(NotFoundError):
        Sandbox.connect("nosuchsandbox")
    os.environ["DELTABOX_BIN"] = "/bin/false"  # no daemon to start: a clear error
    try:
        with pytest.raises(DeltaBoxError) as e:
            Sandbox.create(socket="/nonexistent/deltabox.sock")
        assert "cannot reach" in str(e.value)
    finally:
        del os.environ["DELTABOX_BIN"]


def test_no_daemon_yet_the_sdk_starts_one_as_the_cli_does(daemon, tmp_path):
    binary = str(ROOT / "target" / "release" / "deltabox")
    state = tempfile.mkdtemp(prefix="deltabox-sdk-auto-", dir="/var/tmp")
    socket = os.path.join(state, "api.sock")
    saved = {k: os.environ.get(k) for k in ("DELTABOX_BIN", "DELTABOX_STATE_DIR", "DELTABOX_STORE_SIZE")}
    os.environ.update(DELTABOX_BIN=binary, DELTABOX_STATE_DIR=state, DELTABOX_STORE_SIZE="2G")
    try:
        with Sandbox.create(socket=socket) as sbx:
            assert sbx.commands.run("echo up").stdout == "up\n"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        subprocess.run(["pkill", "-TERM", "-f", f"deltabox --socket {socket}"])
        for _ in range(100):
            if subprocess.run(["pgrep", "-f", f"deltabox --socket {socket}"], stdout=subprocess.DEVNULL).returncode:
                break
            time.sleep(0.1)
        subprocess.run(["umount", "-l", os.path.join(state, "store")], stderr=subprocess.DEVNULL)
        shutil.rmtree(state, ignore_errors=True)


def test_the_async_twin(daemon):
    async def main():
        async with await AsyncSandbox.create() as sbx:
            await sbx.files.write("/a.txt", "one")
            repl = await sbx.sessions.start("python3")
            await repl.run("v = 41")
            ck = await sbx.checkpoint()
            await repl.run("v = 0")
            await sbx.files.write("/a.txt", "two")
            await sbx.rollback(ck)
            assert (await repl.run("print(v + 1)")).stdout == "42\n"
            assert await sbx.files.read("/a.txt") == "one"
            branches = await sbx.fork(ck, n=2)
            outs = await asyncio.gather(*(b.commands.run("cat /a.txt") for b in branches))
            assert [o.stdout for o in outs] == ["one", "one"]
            chunks = []
            r = await sbx.commands.run("echo a; echo b", on_stdout=chunks.append)
            assert "".join(chunks) == r.stdout == "a\nb\n"
            for b in branches:
                await b.kill()

    asyncio.run(main())
