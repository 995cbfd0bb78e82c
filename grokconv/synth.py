"""Synthetic Grok-1 checkpoints in the release's exact on-disk format.

Values have realistic ranges: int8 weights filling [-127, 127] per column (as an absmax quantizer
leaves them) with bf16 scales per column and, for the row-parallel weights, per block of input rows;
float32 embeddings, norms (around 1) and routers. Every file is drawn from its own seeded stream,
so the same seed gives the same bytes, in any order and on any machine.

Trained presets (``tiny-trained``) are not drawn but copied: a checkpoint trained by
``tools/train_tiny.py`` ships inside the package as ``presets/NAME.tar.xz`` with a manifest
``presets/NAME.json`` (the archive's sha256 and every file's); :func:`write_trained` verifies both.
"""
from __future__ import annotations

import hashlib
import json
import math
import tarfile
from pathlib import Path

import numpy as np

from .config import CONFIG_FILE, GrokConfig
from .errors import CheckpointFormatError
from .formats.atomic import atomic_write
from .formats.jax import CKPT_DIR, write_param_file
from .formats.outputs import guard_output, make_fingerprint
from .schema import ParamSpec, param_specs
from .tensor import BF16

__all__ = ["synthesize", "synth_value", "write_trained", "trained_manifest", "TRAINED_PRESETS", "PRESET_DATA"]

PRESET_DATA = Path(__file__).parent / "presets"
TRAINED_PRESETS = ("tiny-trained",)

# Weight gain (std of the dequantized weight times sqrt(fan-in)). Query and key are large so that
# attention logits reach the 30*tanh(x/30) cap in small models; experts and projections are ~1.
_GAIN = {"multi_head_attention/query": 4.0, "multi_head_attention/key": 4.0}
_Q_STD = 255 / math.sqrt(24)  # std of the triangular int8 draw below
_CHUNK = 1 << 26


def _int8_rows(rng: np.random.Generator, r0: int, shape, block: int) -> np.ndarray:
    """Rows ``r0:r0+shape[0]`` of a triangular int8 matrix in [-127, 127] (a cheap bell shape).

    The first row of every block of ``block`` input rows is +-127, so each column of each scale block
    reaches 127 -- what an absmax quantizer leaves, block by block.
    """
    n = math.prod(shape)
    a = np.frombuffer(rng.bytes(n), np.uint8)
    b = np.frombuffer(rng.bytes(n), np.uint8)
    q = ((a >> 1) + (b >> 1)).astype(np.int16) - 127  # 0..254 -> -127..127
    q = q.astype(np.int8).reshape(shape)
    for r in range(-(-r0 // block) * block, r0 + shape[0], block):
        q[r - r0] = 127 * np.sign(q[r - r0] + 0.5).astype(np.int8)
    return q


def synth_value(spec: ParamSpec, cfg: GrokConfig, seed: int):
    """The value of one parameter: ``(weight_chunks, scales)`` for int8, or float32 chunks."""
    rng = np.random.default_rng([seed, spec.index])
    if spec.kind == "qw8":
        K, N, G = spec.shape[-2], spec.shape[-1], spec.scale_groups
        gain = _GAIN.get(spec.slot, 1.0)
        base = gain / math.sqrt(K) / _Q_STD
        jitter = rng.lognormal(0.0, 0.25, size=spec.scale_shape)
        scales = (base * jitter).astype(np.float32).astype(BF16)
        lead = spec.shape[:-2]
        rows = max(1, _CHUNK // N)

        def chunks():
            for e in np.ndindex(*lead) if lead else [()]:
                for r0 in range(0, K, rows):
                    sub = np.random.default_rng([seed, spec.index, *e, r0])
                    yield _int8_rows(sub, r0, (min(rows, K - r0), N), K // G)
        return chunks(), scales
    if spec.slot == "language_model/in_out_embed":
        V, D = spec.shape
        rows = max(1, _CHUNK // D)

        def emb():
            for r0 in range(0, V, rows):
                sub = np.random.default_rng([seed, spec.index, r0])
                yield (sub.standard_normal((min(rows, V - r0), D), dtype=np.float32) * (5 / math.sqrt(D)))
        return emb()
    if spec.slot == "router":
        D = spec.shape[0]
        return rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(4 / math.sqrt(D))
    return (1.0 + 0.1 * rng.standard_normal(spec.shape)).astype(np.float32)  # a norm scale


OWNED = (f"{CKPT_DIR}/tensor*_000", CONFIG_FILE, "tokenizer.model")   # what --overwrite replaces


def synthesize(out: Path, cfg: GrokConfig, *, seed: int = 0, layers=None, progress=None,
               overwrite: bool = False) -> Path:
    """Write a complete checkpoint (``out/ckpt-0/*`` and ``out/grokconv-config.json``).

    Resumable: a file is kept only when a run of this config, seed and layer set made it durable
    (``out/.grokconv/output.json``); another synth's output in ``out`` is an error unless ``overwrite``."""
    out = Path(out)
    cfg = cfg.validate()
    fp = make_fingerprint("synth", None, config=cfg.to_dict(), seed=seed,
                          layers=None if layers is None else sorted(set(layers)))
    with guard_output(out, fp, owned=OWNED, overwrite=overwrite) as guard:
        d = out / CKPT_DIR
        d.mkdir(parents=True, exist_ok=True)
        wanted = None if layers is None else set(layers)
        for spec in param_specs(cfg):
            if wanted is not None and spec.layer is not None and spec.layer not in wanted:
                continue
            path = d / spec.file
            if guard.is_complete(path):
                continue
            value = synth_value(spec, cfg, seed)
            write_param_file(path, spec, value, durable=lambda n, path=path: guard.done(path, n))
            if progress:
                progress(spec)
        cfg.save(out / CONFIG_FILE)
        guard.finish()
    return out


def trained_manifest(name: str = "tiny-trained") -> dict:
    """The manifest of a trained preset: archive name and sha256, every file's sha256, training figures."""
    path = PRESET_DATA / f"{name}.json"
    if name not in TRAINED_PRESETS or not path.is_file():
        raise CheckpointFormatError(f"no trained preset {name!r} (have {', '.join(TRAINED_PRESETS)})", path=path)
    return json.loads(path.read_text())


def write_trained(out: Path, name: str = "tiny-trained", overwrite: bool = False) -> Path:
    """Write the trained preset ``name`` to ``out`` (``ckpt-0/*``, ``grokconv-config.json``,
    ``tokenizer.model``) after checking the packaged archive's sha256 and then each file's."""
    out = Path(out)
    manifest = trained_manifest(name)
    fp = make_fingerprint("synth", None, preset=name, archive_sha256=manifest["archive_sha256"])
    with guard_output(out, fp, owned=OWNED, overwrite=overwrite) as guard:
        _unpack_trained(out, manifest, guard)
        guard.finish()
    return out


def _unpack_trained(out: Path, manifest: dict, guard) -> None:
    archive = PRESET_DATA / manifest["archive"]
    data = archive.read_bytes() if archive.is_file() else b""
    got = hashlib.sha256(data).hexdigest()
    if got != manifest["archive_sha256"]:
        raise CheckpointFormatError(f"sha256 {got} is not the manifest's {manifest['archive_sha256']} "
                                    "(a damaged or partial install)", path=archive)
    files = manifest["files"]
    (out / CKPT_DIR).mkdir(parents=True, exist_ok=True)
    seen = set()
    with tarfile.open(archive, mode="r:xz") as tar:
        for member in tar:
            if not member.isfile() or member.name not in files:
                raise CheckpointFormatError(f"unexpected archive member {member.name!r}", path=archive)
            payload = tar.extractfile(member).read()
            if hashlib.sha256(payload).hexdigest() != files[member.name]:
                raise CheckpointFormatError(f"{member.name}: sha256 differs from the manifest", path=archive)
            path = out / member.name
            if not guard.is_complete(path):
                with atomic_write(path, durable=lambda n, path=path: guard.done(path, n)) as f:
                    f.write(payload)
            seen.add(member.name)
    if seen != set(files):
        raise CheckpointFormatError(f"archive lacks {sorted(set(files) - seen)[:3]}", path=archive)
