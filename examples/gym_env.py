#!/usr/bin/env python3
"""A Gymnasium-style environment over a DeltaBox sandbox: `reset`, `step`, and `clone_state` /
`restore_state` (as ALE environments have) that checkpoint and roll back the whole sandbox — files and live
processes — in milliseconds. Works with or without `gymnasium` installed (it subclasses `gymnasium.Env` when
present).

Observation: the tests passed (an int); action: the index of a candidate edit (`_task.EDITS`); reward: the
change in tests passed; the episode terminates when all pass, truncates after `max_steps`.
"""

import argparse
import random
import time

import _task
from deltabox import Sandbox

try:
    import gymnasium  # type: ignore

    _Base = gymnasium.Env
except ImportError:  # pragma: no cover - optional
    _Base = object

EVAL = "import sys; sys.path.insert(0, '/work')\n" + _task.TESTS


class DeltaBoxCodeEnv(_Base):
    metadata = {"render_modes": []}

    def __init__(self, max_steps: int = 6):
        self.max_steps = max_steps
        self.sbx = Sandbox.create()
        self.sbx.files.write("/work/calc.py", _task.MODULE)
        self.repl = self.sbx.sessions.start("python3")
        self.repl.run("steps = 0")
        self._initial = self.sbx.checkpoint()
        self.source = _task.MODULE
        self.steps = 0
        self.passed = self._evaluate()

    def _evaluate(self) -> int:
        return int(self.repl.run(EVAL).stdout.split()[-1])

    def reset(self, *, seed=None, options=None):
        self.sbx.rollback(self._initial)
        self.source, self.steps = _task.MODULE, 0
        self.passed = self._evaluate()
        return self.passed, {"valid_actions": _task.applicable(self.source)}

    def step(self, action: int):
        edit = _task.EDITS[action]
        if edit[1] in self.source:
            self.source = _task.apply(self.source, edit)
            self.sbx.files.write("/work/calc.py", self.source)
        self.steps += 1
        self.repl.run("steps += 1")
        before, self.passed = self.passed, self._evaluate()
        terminated = self.passed == _task.N_TESTS
        truncated = self.steps >= self.max_steps
        return self.passed, self.passed - before, terminated, truncated, {"valid_actions": _task.applicable(self.source)}

    def clone_state(self):
        """The whole environment — files and the live interpreter — as a checkpoint."""
        return (self.sbx.checkpoint(), self.source, self.steps, self.passed)

    def restore_state(self, state) -> None:
        ck, self.source, self.steps, self.passed = state
        self.sbx.rollback(ck)

    def close(self):
        self.sbx.kill()
        self.sbx.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    env = DeltaBoxCodeEnv()
    rng = random.Random(1)
    try:
        for ep in range(1 if a.quick else a.episodes):
            obs, info = env.reset()
            total, done = 0, False
            while not done:
                # One-step lookahead with clone/restore: try every valid action, keep the best.
                saved = env.clone_state()
                t = time.perf_counter()
                scores = []
                for act in info["valid_actions"]:
                    env.restore_state(saved)
                    o, r, term, trunc, _ = env.step(act)
                    scores.append((r, rng.random(), act))
                look_ms = (time.perf_counter() - t) * 1e3
                env.restore_state(saved)
                best = max(scores)[2] if scores else 0
                obs, r, term, trunc, info = env.step(best)
                total += r
                done = term or trunc or not info["valid_actions"]
                print(f"  episode {ep}: {_task.EDITS[best][0]:<22} -> {obs}/{_task.N_TESTS} tests ({len(scores)} actions looked ahead in {look_ms:.0f} ms)")
            # The interpreter rolled back with every restore: its step counter is the episode's, not the total.
            assert int(env.repl.run("print(steps)").stdout) == env.steps
            print(f"episode {ep}: return {total}, {'solved' if obs == _task.N_TESTS else 'not solved'} in {env.steps} steps")
    finally:
        env.close()


if __name__ == "__main__":
    main()
