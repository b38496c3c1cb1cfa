"""Reading the server's Prometheus text in tests: series by name and labels."""

from __future__ import annotations

import re

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')


def series(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of ``name`` whose labels include ``labels``."""
    out = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match and match.group(1) == name:
            found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                out.append((found, float(match.group(3))))
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples with ``labels`` (``NAME{a="b"}`` works as ``name`` too)."""
    if name.endswith("}"):
        name, _, inside = name[:-1].partition("{")
        labels = {**dict(re.findall(r'(\w+)="([^"]*)"', inside)), **labels}
    return sum(value for _, value in series(text, name, **labels))


def by_status(text: str) -> dict[str, float]:
    """Requests counted by status, over models and protocols (statuses never seen left out)."""
    out: dict[str, float] = {}
    for found, value in series(text, "hybridvit_requests_total"):
        out[found["status"]] = out.get(found["status"], 0.0) + value
    return {status: count for status, count in out.items() if count}
