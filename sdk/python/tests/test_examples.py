"""The examples run against the real daemon; the tree search also driven by an OpenAI-compatible endpoint
(a local stand-in serving the chat-completions protocol, with some unusable answers mixed in)."""

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
import _task  # noqa: E402


def run_example(name, *args, env=None):
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--quick", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_the_examples_run(daemon):
    out = run_example("tree_search.py")
    assert "solved at depth 4" in out and "nodes/s" in out
    out = run_example("rl_fanout.py")
    assert "state intact True" in out and "state intact False" not in out
    out = run_example("gym_env.py")
    assert "solved in 4 steps" in out


class FakeLLM(http.server.BaseHTTPRequestHandler):
    requests = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions" and body["messages"][0]["role"] == "user"
        FakeLLM.requests += 1
        source = body["messages"][0]["content"].split("```python\n", 1)[1].rsplit("\n```", 1)[0]
        answers = ["I think the bug is elsewhere.", json.dumps({"name": "bogus", "old": "not in it", "new": "x"})]
        for i in (0, 2, 4, 6):  # the right fixes, as JSON in prose
            name, old, new = _task.EDITS[i]
            if old in source:
                answers.append("Here: " + json.dumps({"name": name, "old": old, "new": new}))
        out = json.dumps({"choices": [{"index": k, "message": {"role": "assistant", "content": a}} for k, a in enumerate(answers)]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out.encode())

    def log_message(self, *a):
        pass


def test_tree_search_driven_by_an_openai_compatible_endpoint(daemon):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        out = run_example("tree_search.py", env={"DELTABOX_LLM_URL": url, "DELTABOX_LLM_KEY": "k"})
        assert "an LLM's proposals" in out and "solved at depth 4" in out, out
        assert FakeLLM.requests > 0
    finally:
        server.shutdown()
