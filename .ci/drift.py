"""The packages whose installed versions differ from the lock (constraints.txt): `pip freeze | python drift.py`."""
import sys
from pathlib import Path


def pins(lines):
    out = {}
    for line in lines:
        line = line.strip()
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[name.lower().replace("_", "-")] = version
    return out


lock = pins((Path(__file__).resolve().parent.parent / "constraints.txt").read_text().splitlines())
now = {k: v for k, v in pins(sys.stdin).items() if k not in ("torch", "triton")}
rows = [f"{k}: {lock.get(k, '-')} -> {now.get(k, '-')}" for k in sorted(set(lock) | set(now))
        if lock.get(k) != now.get(k)]
print("\n".join(rows) or "none")
