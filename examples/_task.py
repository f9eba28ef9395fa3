"""The small real coding task the examples search over: a buggy module, its tests, and candidate edits.

Four functions, each with a bug; every bug has one right fix and a few plausible wrong ones. A state is the
set of edits applied; the reward is the number of tests that pass (run inside the sandbox by python3).
"""

MODULE = '''\
def mean(xs):
    return sum(xs) / (len(xs) + 1)


def clamp(x, lo, hi):
    return max(lo, min(x, lo))


def is_leap(year):
    return year % 4 == 0 and year % 100 != 0


def fizz(n):
    if n % 3 == 0:
        return "Fizz"
    if n % 5 == 0:
        return "Buzz"
    if n % 15 == 0:
        return "FizzBuzz"
    return str(n)
'''

TESTS = '''\
import sys
# No cached bytecode: a file rewritten within the same second at the same size would reload stale code.
sys.dont_write_bytecode = True
sys.path.insert(0, "/work")
import importlib, calc
importlib.reload(calc)
checks = [
    lambda: calc.mean([1, 2, 3]) == 2,
    lambda: calc.mean([5]) == 5,
    lambda: calc.clamp(5, 0, 10) == 5,
    lambda: calc.clamp(-1, 0, 10) == 0,
    lambda: calc.clamp(11, 0, 10) == 10,
    lambda: calc.is_leap(2024) and not calc.is_leap(2023),
    lambda: calc.is_leap(2000) and not calc.is_leap(1900),
    lambda: calc.fizz(3) == "Fizz" and calc.fizz(5) == "Buzz",
    lambda: calc.fizz(15) == "FizzBuzz" and calc.fizz(7) == "7",
]
passed = 0
for c in checks:
    try:
        passed += bool(c())
    except Exception:
        pass
print(passed)
'''

N_TESTS = 9

# (name, old text, new text): replacing `old` by `new` in calc.py. One right fix per bug, the rest wrong.
EDITS = [
    ("mean: len(xs)", "(len(xs) + 1)", "len(xs)"),
    ("mean: len(xs) - 1", "(len(xs) + 1)", "(len(xs) - 1)"),
    ("clamp: min(x, hi)", "min(x, lo))", "min(x, hi))"),
    ("clamp: swap", "max(lo, min(x, lo))", "min(lo, max(x, hi))"),
    ("leap: or 400", "year % 100 != 0", "(year % 100 != 0 or year % 400 == 0)"),
    ("leap: and 400", "year % 100 != 0", "year % 400 == 0"),
    ("fizz: 15 first", '''    if n % 3 == 0:
        return "Fizz"
    if n % 5 == 0:
        return "Buzz"
    if n % 15 == 0:
        return "FizzBuzz"''', '''    if n % 15 == 0:
        return "FizzBuzz"
    if n % 3 == 0:
        return "Fizz"
    if n % 5 == 0:
        return "Buzz"'''),
    ("fizz: 5 to 4", "n % 5 == 0", "n % 4 == 0"),
]


def apply(source: str, edit) -> str:
    _, old, new = edit
    return source.replace(old, new, 1)


def applicable(source: str):
    return [i for i, e in enumerate(EDITS) if e[1] in source]
