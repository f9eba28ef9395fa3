#!/usr/bin/env python3
"""Best-first tree search over a small real coding task, in a DeltaBox sandbox — no network, no LLM.

The task (`_task.py`): a buggy module with nine tests; actions are candidate edits (right and wrong ones);
reward = tests passed, measured by a python3 REPL session inside the sandbox that also keeps the agent's own
state (every evaluation it has made along the path). Every node is checkpointed — files *and* the live REPL —
and expanding a node rolls back to it. The same search runs twice in the same sandbox setup:

  * DeltaBox: `sbx.checkpoint()` per node, `sbx.rollback(node)` to expand it;
  * copy-based reset, what sandboxes without live checkpoints do: `cp -a` of the workspace per node, and to
    expand a node `rm -rf` + `cp -a` back, then a fresh interpreter that replays the node's path (its state
    cannot be copied).

and prints nodes explored per second for each. The workspace carries a vendored dependency tree (`--deps-mb`)
like a real project does; that is what a copy pays for.
"""

import argparse
import heapq
import time

import _task
import llm
from deltabox import Sandbox

SETUP = "import sys; sys.path.insert(0, '/work'); evaluations = []"
EVAL = _task.TESTS.replace("print(passed)", "evaluations.append(passed); print(passed)")


def make_deps(sbx: Sandbox, mb: int) -> None:
    files = max(1, mb * 1024 // 16)
    r = sbx.commands.run(
        [
            "python3",
            "-c",
            "import os\n"
            f"for i in range({files}):\n"
            "    d = f'/work/vendor/pkg{i // 100}'\n"
            "    os.makedirs(d, exist_ok=True)\n"
            "    open(f'{d}/mod{i}.py', 'wb').write(os.urandom(16384))\n",
        ],
        timeout=600,
    )
    assert r.exit_code == 0, r.stderr


class DeltaBoxReset:
    name = "DeltaBox checkpoint + rollback"

    def __init__(self, sbx: Sandbox):
        self.sbx = sbx
        self.repl = sbx.sessions.start("python3")
        self.repl.run(SETUP)

    def save(self, path):
        return self.sbx.checkpoint()

    def restore(self, handle, path):
        self.sbx.rollback(handle)  # files and the REPL (with its `evaluations`) as they were at the node

    def evaluate(self) -> int:
        return int(self.repl.run(EVAL).stdout.split()[-1])


class CopyReset:
    name = "copy-based reset (cp -a + interpreter replay)"

    def __init__(self, sbx: Sandbox):
        self.sbx = sbx
        self.n = 0
        self.repl = self._fresh_repl([])

    def _fresh_repl(self, path):
        repl = self.sbx.sessions.start("python3")
        repl.run(SETUP)
        # The interpreter's state cannot be copied: rebuild it by replaying the node's evaluations.
        for _ in path:
            repl.run(EVAL)
        return repl

    def save(self, path):
        self.n += 1
        r = self.sbx.commands.run(f"mkdir -p /snap && cp -a /work /snap/{self.n}")
        assert r.exit_code == 0, r.stderr
        return self.n

    def restore(self, handle, path):
        r = self.sbx.commands.run(f"rm -rf /work && cp -a /snap/{handle} /work")
        assert r.exit_code == 0, r.stderr
        self.repl.kill()
        self.repl = self._fresh_repl(path)

    def evaluate(self) -> int:
        return int(self.repl.run(EVAL).stdout.split()[-1])


def actions(src: str, passed: int):
    """The candidate edits at a node: the fixed list, or an LLM's proposals (`llm.py`, when configured)."""
    if llm.enabled():
        return llm.propose(src, passed, _task.N_TESTS)
    return [_task.EDITS[a] for a in _task.applicable(src)]


def search(sbx: Sandbox, reset, budget: int):
    """Best-first: expand the most promising node (most tests passing, then shallowest) until `budget` children
    are made. Returns (nodes, seconds, best reward, depth of the first full solution or None)."""
    start = time.perf_counter()
    source = _task.MODULE
    reward = reset.evaluate()
    root = (source, [], reset.save([]))
    frontier = [(-reward, 0, 0, root)]
    made, best, solved_at, tie = 0, reward, None, 1
    while frontier and made < budget:
        r_node, _, _, (src, path, handle) = heapq.heappop(frontier)
        for edit in actions(src, -r_node):
            if made >= budget:
                break
            reset.restore(handle, path)
            child_src = _task.apply(src, edit)
            sbx.files.write("/work/calc.py", child_src)
            r = reset.evaluate()
            child = (child_src, path + [edit[0]], reset.save(path + [edit[0]]))
            made += 1
            best = max(best, r)
            if r == _task.N_TESTS and solved_at is None:
                solved_at = len(child[1])
            heapq.heappush(frontier, (-r, len(child[1]), tie, child))
            tie += 1
    return made, time.perf_counter() - start, best, solved_at


def run(kind, budget: int, deps_mb: int):
    with Sandbox.create(memory="2G") as sbx:
        sbx.files.write("/work/calc.py", _task.MODULE)
        make_deps(sbx, deps_mb)
        reset = kind(sbx)
        made, secs, best, solved = search(sbx, reset, budget)
        print(
            f"  {reset.name:<48} {made:>4} nodes in {secs:6.2f} s = {made / secs:7.1f} nodes/s; "
            f"best {best}/{_task.N_TESTS} tests" + (f", solved at depth {solved}" if solved else "")
        )
        return made / secs, best, solved


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=int, default=60, help="nodes to make with each method")
    ap.add_argument("--deps-mb", type=int, default=64, help="size of the vendored dependency tree")
    ap.add_argument("--quick", action="store_true", help="a short run (CI)")
    a = ap.parse_args()
    if a.quick:
        a.budget, a.deps_mb = 24, 16
    source = "an LLM's proposals" if llm.enabled() else f"{len(_task.EDITS)} candidate edits"
    print(f"tree search: best-first over {source}, {a.budget} nodes, workspace with {a.deps_mb} MB of dependencies")
    ours, *found = run(DeltaBoxReset, a.budget, a.deps_mb)
    theirs, *found_too = run(CopyReset, a.budget, a.deps_mb)
    print(f"  DeltaBox explores {ours / theirs:.1f}x the nodes per second of the copy-based reset")
    # The same search: both must have found the same thing.
    assert found == found_too, f"the two searches disagree: {found} vs {found_too}"


if __name__ == "__main__":
    main()
