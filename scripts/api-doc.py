#!/usr/bin/env python3
"""Renders docs/api.md (the API reference) from the OpenAPI document (docs/openapi.json, which
`deltabox openapi` prints). `make test` checks both are current."""

import json
import sys


def ref_name(s):
    if not isinstance(s, dict):
        return "?"
    if "$ref" in s:
        return s["$ref"].rsplit("/", 1)[-1]
    if s.get("type") == "array":
        return f"[{ref_name(s.get('items', {}))}]"
    if "oneOf" in s or "anyOf" in s:
        alts = [ref_name(x) for x in s.get("oneOf", s.get("anyOf", [])) if x.get("type") != "null"]
        return " | ".join(alts) + ("?" if len(alts) < len(s.get("oneOf", s.get("anyOf", []))) else "")
    t = s.get("type")
    if isinstance(t, list):
        base = [x for x in t if x != "null"]
        return (base[0] if base else "null") + ("?" if "null" in t else "")
    return t or "object"


def main():
    doc = json.load(open(sys.argv[1]))
    out = [f"# {doc['info']['title']} API reference", "",
           f"Generated from `docs/openapi.json` (`deltabox openapi`; served at `GET /v1/openapi.json`) by "
           "`scripts/api-doc.py`. " + doc["info"].get("description", ""), ""]
    tags = {}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            tags.setdefault((op.get("tags") or ["other"])[0], []).append((path, method, op))
    for tag in sorted(tags):
        out += [f"## {tag}", ""]
        for path, method, op in tags[tag]:
            out.append(f"### `{method.upper()} {path}`")
            out.append("")
            desc = " ".join(x for x in (op.get("summary"), op.get("description")) if x)
            if desc:
                out += [desc, ""]
            params = op.get("parameters", [])
            if params:
                out.append("Parameters: " + ", ".join(
                    f"`{p['name']}` ({p['in']}{'' if p.get('required') else ', optional'}): {p.get('description', ref_name(p.get('schema', {})))}"
                    for p in params) + ".")
                out.append("")
            body = op.get("requestBody")
            if body:
                for ct, c in body.get("content", {}).items():
                    out.append(f"Body ({ct}): `{ref_name(c.get('schema', {}))}`" + ("" if body.get("required") else " (optional)") + ".")
                out.append("")
            out.append("| status | body | meaning |")
            out.append("|---|---|---|")
            for status, r in op.get("responses", {}).items():
                ct = r.get("content", {})
                body = ", ".join(f"`{ref_name(c.get('schema', {}))}` ({k})" for k, c in ct.items()) or "—"
                out.append(f"| {status} | {body} | {r.get('description', '')} |")
            out.append("")
    out += ["## Types", ""]
    for name, s in sorted(doc.get("components", {}).get("schemas", {}).items()):
        out.append(f"### `{name}`")
        out.append("")
        if s.get("description"):
            out += [s["description"], ""]
        props = s.get("properties")
        if props:
            req = set(s.get("required", []))
            out.append("| field | type | |")
            out.append("|---|---|---|")
            for k, v in props.items():
                d = (v.get("description") or "").replace("\n", " ")
                out.append(f"| `{k}` | `{ref_name(v)}`{'' if k in req else ' (optional)'} | {d} |")
            out.append("")
        elif "enum" in s:
            out += ["One of: " + ", ".join(f"`{e}`" for e in s["enum"]) + ".", ""]
        elif "oneOf" in s:
            out += ["One of: " + ", ".join(f"`{json.dumps(x.get('properties', {}).get('type', {}).get('enum', [ref_name(x)])[0]) if isinstance(x, dict) else x}`" for x in s["oneOf"]) + ".", ""]
    sys.stdout.write("\n".join(out).rstrip() + "\n")


if __name__ == "__main__":
    main()
