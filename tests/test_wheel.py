"""A built wheel, installed into a fresh virtual environment, does every main job from another directory.

The wheel is built from a copy of the source tree and installed with pip into a new venv; the commands
then run with that venv's ``grokconv`` from an empty directory, so nothing of the source tree can be
imported (checked: ``grokconv`` and its mappings resolve inside the venv).

Dependencies: to fit CI's time, the venv sees only the wheel's declared dependency closure (its
``Requires-Dist``, followed through each dependency's own metadata) as links into the test
environment's site-packages: a dependency missing from pyproject.toml is missing there too. With
``GROKCONV_WHEEL_FULL_INSTALL=1`` (``make wheel-check``) pip resolves and installs them instead
(about 70 s here, most of it torch).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
_SKIP = {".venv", "build", ".git", "__pycache__", ".pytest_cache", "dist"}


def _package_dirs() -> set[str]:
    """Every directory under grokconv/ that holds code or data, as a dotted package name."""
    out = set()
    for d in [ROOT / "grokconv", *(p for p in (ROOT / "grokconv").rglob("*") if p.is_dir())]:
        if d.name in _SKIP or any(part in _SKIP for part in d.relative_to(ROOT).parts):
            continue
        if any(f.suffix in (".py", ".json") for f in d.iterdir() if f.is_file()):
            out.add(".".join(d.relative_to(ROOT).parts))
    return out


def test_every_package_directory_is_listed():
    st = PYPROJECT["tool"]["setuptools"]
    listed = set(st["packages"])
    missing = _package_dirs() - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    assert st["package-dir"]["grokconv.mappings"] == "mappings" and "grokconv.mappings" in listed
    for pkg in listed - {"grokconv.mappings"}:
        assert (ROOT / pkg.replace(".", "/")).is_dir(), f"{pkg} is listed but has no directory"


# -- the dependency closure ----------------------------------------------------------------------------
def _requirements(reqs) -> list[str]:
    from packaging.requirements import Requirement
    names = []
    for text in reqs or []:
        r = Requirement(text)
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            names.append(r.name)
    return names


def _closure(top: list[str]) -> list[metadata.Distribution]:
    seen, todo, out = set(), list(top), []
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"dependency {name} is not installed in the test environment")
        out.append(dist)
        todo.extend(_requirements(dist.requires))
    return out


def _link_dependencies(wheel: Path, deps: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    declared = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    dists = _closure(_requirements(declared))
    deps.mkdir()
    for dist in dists:
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src, dst = base / top, deps / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
    return sorted(d.metadata["Name"] for d in dists)


# -- the wheel in a fresh venv -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if n in _SKIP or n.endswith(".egg-info")])
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("grokconv-*.whl"))
    venv = tmp / "venv"
    full = os.environ.get("GROKCONV_WHEEL_FULL_INSTALL") == "1"
    subprocess.run([sys.executable, "-m", "venv", *([] if full else ["--without-pip"]), str(venv)], check=True)
    py = venv / "bin" / "python"
    if full:
        constraints = ["-c", str(ROOT / ".ci" / "constraints.txt")]
        links = ["--find-links", "/opt/wheels"] if Path("/opt/wheels").is_dir() else []
        subprocess.run([str(py), "-m", "pip", "install", "-q", *links, *constraints, str(wheel)], check=True)
    else:
        _link_dependencies(wheel, tmp / "deps")
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "grokconv-test-deps.pth").write_text(str(tmp / "deps") + "\n")
        subprocess.run([*pip, "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)], check=True)
    work = tmp / "work"
    work.mkdir()
    return {"wheel": wheel, "venv": venv, "bin": venv / "bin", "work": work}


def _run(inst, *args, ok=True):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{inst['bin']}:{env.get('PATH', '')}"
    p = subprocess.run([str(inst["bin"] / "grokconv"), *args], cwd=inst["work"], env=env, capture_output=True,
                       text=True, timeout=300)
    if ok:
        assert p.returncode == 0, f"grokconv {' '.join(args)}: {p.stdout}\n{p.stderr}"
    return p


def test_wheel_contents(installed):
    with zipfile.ZipFile(installed["wheel"]) as z:
        names = set(z.namelist())
    for f in sorted((ROOT / "mappings").glob("*.json")):
        assert f"grokconv/mappings/{f.name}" in names
    for f in ("configs/tiny.json", "configs/grok-1.json", "hf_code/modeling_grok1.py",
              "hf_code/configuration_grok1.py", "engines/__init__.py", "commands/convert.py"):
        assert f"grokconv/{f}" in names, f
    for pkg in _package_dirs():
        assert any(n.startswith(pkg.replace(".", "/") + "/") for n in names), pkg


def test_installed_package_is_the_wheel(installed):
    py = installed["bin"] / "python"
    code = ("import grokconv, grokconv.mapping as m; print(grokconv.__file__); print(m.MAPPINGS_DIR); "
            "print(','.join(m.layout_names())); print(','.join(sorted(p.name for p in m.MAPPINGS_DIR.glob('*.json'))))")
    out = subprocess.run([str(py), "-c", code], cwd=installed["work"], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    file, mappings, layouts, mcore = out.stdout.split("\n")[:4]
    venv = str(installed["venv"].resolve())
    assert file.startswith(venv) and mappings.startswith(venv), (file, mappings)
    assert not file.startswith(str(ROOT))
    assert layouts == "hf,keyfan,sglang"
    assert mcore.split(",") == sorted(p.name for p in (ROOT / "mappings").glob("*.json"))


def test_every_main_job_from_another_directory(installed):
    w = installed["work"]
    _run(installed, "synth", "tiny", "--preset", "tiny")
    inv = json.loads(_run(installed, "inspect", "tiny", "--json").stdout)
    assert inv and "language_model/in_out_embed/embeddings" in json.dumps(inv)
    for layout in ("hf", "sglang"):
        _run(installed, "to-safetensors", "tiny", layout, "--layout", layout, "--no-progress")
        assert (w / layout / "modeling_grok1.py").is_file()
    # (without --tokenizer the keyfan layout is refused: tests/test_engines.py)
    (w / "tok.model").write_bytes(b"sentencepiece model bytes")
    _run(installed, "to-safetensors", "tiny", "keyfan", "--layout", "keyfan", "--tokenizer", "tok.model",
         "--no-progress")
    assert (w / "keyfan" / "tokenizer.model").read_bytes() == b"sentencepiece model bytes"
    _run(installed, "to-safetensors", "tiny", "int8", "--quantize", "int8", "--no-progress")
    _run(installed, "to-megatron", "tiny", "mcore", "--tp", "2", "--no-progress")
    assert (w / "mcore" / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    rep = _run(installed, "parity", "tiny", "mcore", "--layers", "0-3", "--no-progress", "--json", "rep.json")
    assert "PASS" in rep.stdout and json.loads((w / "rep.json").read_text())["passed"] is True
    q = _run(installed, "parity", "tiny", "int8", "--layers", "0-1", "--no-progress")
    assert "expect exact" in q.stdout and "PASS" in q.stdout     # lossless int8: every bit equal
    # an engine whose library the wheel's environment lacks: a clear error, not a traceback
    miss = _run(installed, "parity", "tiny", "hf", "--engine", "transformers", ok=False)
    assert miss.returncode == 2 and "Traceback" not in miss.stderr and "grokconv[transformers]" in miss.stderr
