"""A real DeltaBox daemon per test session (no mocks): the repository's release binary, its own state directory."""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def daemon():
    binary = os.environ.get("DELTABOX_BIN") or str(ROOT / "target" / "release" / "deltabox")
    state = Path(tempfile.mkdtemp(prefix="deltabox-sdk-", dir="/var/tmp"))
    socket = state / "api.sock"
    env = dict(os.environ, DELTABOX_STATE_DIR=str(state), DELTABOX_SOCKET=str(socket), DELTABOX_STORE_SIZE="4G")
    log = open(state / "daemon.log", "ab")
    proc = subprocess.Popen([binary, "daemon"], env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://d") as c:
                if c.get("/v1/health").status_code == 200:
                    break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("daemon did not start: " + (state / "daemon.log").read_text())
        time.sleep(0.05)
    old = os.environ.get("DELTABOX_SOCKET")
    os.environ["DELTABOX_SOCKET"] = str(socket)
    yield str(socket)
    if old is None:
        os.environ.pop("DELTABOX_SOCKET", None)
    else:
        os.environ["DELTABOX_SOCKET"] = old
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    subprocess.run(["umount", "-l", str(state / "store")], stderr=subprocess.DEVNULL)
    shutil.rmtree(state, ignore_errors=True)
