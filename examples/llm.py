"""Optional: candidate edits proposed by an OpenAI-compatible chat endpoint instead of the fixed list.

Set DELTABOX_LLM_URL (e.g. http://localhost:8000/v1), and optionally DELTABOX_LLM_MODEL and DELTABOX_LLM_KEY.
Each proposal must be a JSON object {"name": ..., "old": ..., "new": ...}: replace `old` (verbatim in the module)
by `new`. Proposals are cached by module text, so every search method in one run sees the same actions.
"""

import json
import os
import re
from typing import Dict, List, Tuple

import httpx

Edit = Tuple[str, str, str]
_cache: Dict[str, List[Edit]] = {}

PROMPT = (
    "You fix bugs in a Python module. Its tests report how many of {n} checks pass: {passed}.\n"
    "Propose ONE small edit as a JSON object with keys name, old, new: `old` must appear verbatim in the "
    "module and is replaced by `new`. Answer with the JSON object only.\n\nModule:\n```python\n{source}\n```"
)


def enabled() -> bool:
    return bool(os.environ.get("DELTABOX_LLM_URL"))


def _parse(text: str, source: str):
    m = re.search(r"\{.*\}", text, re.S)
    if not m:
        return None
    try:
        d = json.loads(m.group(0))
    except ValueError:
        return None
    old, new = d.get("old"), d.get("new")
    if not isinstance(old, str) or not isinstance(new, str) or not old or old not in source or old == new:
        return None
    return (str(d.get("name") or "llm edit")[:40], old, new)


def propose(source: str, passed: int, n_tests: int, k: int = 4) -> List[Edit]:
    """Up to `k` distinct applicable edits for `source` (cached)."""
    if source in _cache:
        return _cache[source]
    url = os.environ["DELTABOX_LLM_URL"].rstrip("/") + "/chat/completions"
    headers = {}
    if os.environ.get("DELTABOX_LLM_KEY"):
        headers["Authorization"] = "Bearer " + os.environ["DELTABOX_LLM_KEY"]
    body = {
        "model": os.environ.get("DELTABOX_LLM_MODEL", "gpt-4o-mini"),
        "messages": [{"role": "user", "content": PROMPT.format(n=n_tests, passed=passed, source=source)}],
        "n": k,
        "temperature": 0.8,
    }
    r = httpx.post(url, json=body, headers=headers, timeout=120)
    r.raise_for_status()
    edits: List[Edit] = []
    for choice in r.json().get("choices", []):
        e = _parse(choice.get("message", {}).get("content", ""), source)
        if e and all(e[1:] != x[1:] for x in edits):
            edits.append(e)
    _cache[source] = edits
    return edits
