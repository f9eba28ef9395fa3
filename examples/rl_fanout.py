#!/usr/bin/env python3
"""RL fan-out: fork N live branches from one mid-trajectory checkpoint, run a different rollout in each, and
collect the rewards — no network, no LLM.

A trajectory on the task in `_task.py` runs a few edits in a sandbox whose python3 REPL holds a 64 MiB
"model state" (the agent's memory); at the midpoint it is checkpointed and forked N ways in one atomic call.
Every branch is a sandbox of its own with the REPL alive (same pid, same 64 MiB, verified), applies its own
random continuation, and reports its reward (tests passed).
"""

import argparse
import concurrent.futures
import random
import time

import _task
from deltabox import Sandbox

EVAL = "import sys; sys.path.insert(0, '/work')\n" + _task.TESTS


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=16, help="branches")
    ap.add_argument("--steps", type=int, default=3, help="edits each branch applies after the fork")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.n = 4
    rng = random.Random(7)
    with Sandbox.create(memory=f"{512 + a.n * 96}M") as sbx:
        sbx.files.write("/work/calc.py", _task.MODULE)
        repl = sbx.sessions.start("python3")
        repl.run("import hashlib, os; state = bytearray(os.urandom(1 << 20)) * 64; digest = hashlib.sha256(state).hexdigest()")
        # The first half of the trajectory: one edit, shared by every branch.
        src = _task.apply(_task.MODULE, _task.EDITS[0])
        sbx.files.write("/work/calc.py", src)
        mid_reward = int(repl.run(EVAL).stdout.split()[-1])
        ck = sbx.checkpoint()
        t = time.perf_counter()
        branches = sbx.fork(ck, n=a.n)
        fork_ms = (time.perf_counter() - t) * 1e3
        try:
            def rollout(i_b):
                i, b = i_b
                r = random.Random(rng.random() + i)
                s = b.sessions.get(repl.id)
                same = s.run("print(hashlib.sha256(state).hexdigest() == digest)").stdout.strip()
                code = src
                taken = []
                for _ in range(a.steps):
                    choices = _task.applicable(code)
                    if not choices:
                        break
                    e = r.choice(choices)
                    code = _task.apply(code, _task.EDITS[e])
                    taken.append(_task.EDITS[e][0])
                b.files.write("/work/calc.py", code)
                reward = int(s.run(EVAL).stdout.split()[-1])
                return i, same == "True", reward, taken

            with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
                results = sorted(pool.map(rollout, enumerate(branches)))
        finally:
            for b in branches:
                b.kill()
        print(f"rl fan-out: {a.n} live branches forked from a mid-trajectory checkpoint (REPL holding 64 MiB) in {fork_ms:.0f} ms")
        print(f"  reward at the checkpoint: {mid_reward}/{_task.N_TESTS}")
        for i, same, reward, taken in results:
            print(f"  branch {i:>2}: state intact {same}, reward {reward}/{_task.N_TESTS} after {', '.join(taken) or 'nothing'}")
        assert all(same for _, same, _, _ in results), "a branch lost the REPL's state"
        best = max(results, key=lambda x: x[2])
        print(f"  best branch {best[0]} ({best[2]}/{_task.N_TESTS}); mean reward {sum(r[2] for r in results) / len(results):.2f}")


if __name__ == "__main__":
    main()
