"""Numerical parity between two checkpoints: the reference forward on both, compared layer by layer.

``run_parity(reader_a, reader_b, tokens)`` runs :class:`~grokconv.forward.ReferenceForward` on both
readers stage by stage (embeddings, each layer, head), A then B, so that at most one layer of one
model's weights is in memory at any time. It compares the residual stream after every layer and the
final logits, and judges them against a threshold row of :data:`THRESHOLDS` chosen by conversion kind.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from .errors import EngineUnavailableError, GrokconvError, MissingTensorError, ParityError
from .formats.base import CheckpointReader, _ranges
from .forward import ReferenceForward, Semantics, exact_matmul, resolve_layers
from .runtime import peak_memory
from .schema import LAYER_PREFIX
from .thresholds import KINDS, THRESHOLDS, Thresholds

__all__ = ["Thresholds", "THRESHOLDS", "KINDS", "LayerStats", "LogitStats", "ParityReport", "run_parity",
           "run_engine_parity", "resolve_thresholds", "infer_kind", "compare_hidden", "compare_logits", "random_tokens",
           "parse_tokens", "encode_text"]




@dataclass
class LayerStats:
    layer: int
    max_abs: float
    rel_l2: float
    cosine: float


@dataclass
class LogitStats:
    max_abs: float
    kl: float
    top1: float
    top5: float


@dataclass
class ParityReport:
    kind: str
    thresholds: Thresholds
    layers: list[int]
    device: str
    dtype: str
    tokens: list[list[int]]
    hidden: list[LayerStats]
    logits: LogitStats
    failures: list[str]
    profile: dict
    a: dict = field(default_factory=dict)       # path, format, semantics of each side
    b: dict = field(default_factory=dict)
    engine: str = "reference"                   # what computed side B (grokconv.engines)
    notes: list[str] = field(default_factory=list)
    logits_a: torch.Tensor | None = field(default=None, repr=False)   # [B, T, V] float32
    logits_b: torch.Tensor | None = field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        return not self.failures

    def check(self) -> "ParityReport":
        """Raise :class:`ParityError` (carrying this report as ``.report``) if a threshold was exceeded."""
        if self.failures:
            err = ParityError(f"parity failed at the {self.kind!r} threshold: " + "; ".join(self.failures),
                              hint="run with --json to see every figure; --expect picks a looser kind")
            err.report = self
            raise err
        return self

    def to_dict(self) -> dict:
        return {
            "passed": self.passed, "failures": self.failures, "kind": self.kind,
            "thresholds": {**self.thresholds.limits(), "note": self.thresholds.note},
            "a": self.a, "b": self.b, "device": self.device, "dtype": self.dtype, "layers": self.layers,
            "batch": len(self.tokens), "seq_len": len(self.tokens[0]) if self.tokens else 0, "tokens": self.tokens,
            "hidden": [dataclasses.asdict(s) for s in self.hidden],
            "logits": dataclasses.asdict(self.logits), "profile": self.profile,
            "engine": self.engine, "notes": self.notes,
        }

    def save_logits(self, path) -> None:
        """``a`` and ``b``: float32 arrays [batch, tokens, vocab]."""
        np.savez(path, a=self.logits_a.numpy(), b=self.logits_b.numpy())

    def format(self) -> str:
        lines = [f"A: {self.a.get('path')} ({self.a.get('format')})",
                 f"B: {self.b.get('path')} ({self.b.get('format')})"
                 + (f", engine {self.engine}" + (f" {self.b['engine_version']}" if self.b.get("engine_version") else "")
                    if self.engine != "reference" else ""),
                 f"tokens {len(self.tokens)}x{len(self.tokens[0])}, layers {_ranges(self.layers)}, "
                 f"{self.device}, {self.dtype}, expect {self.kind}"]
        if self.hidden:
            lines.append(f"{'layer':>6} {'max abs diff':>14} {'rel L2':>12} {'cosine':>12}")
        for s in self.hidden:
            lines.append(f"{s.layer:>6} {_num(s.max_abs):>14} {_num(s.rel_l2):>12} {_num(s.cosine, 8):>12}")
        lines.extend(f"note: {n}" for n in self.notes)
        lg = self.logits
        lines.append(f"logits  max abs diff: {_num(lg.max_abs)}  KL(A||B): {_num(lg.kl)}  "
                     f"top-1 agreement: {round(lg.top1, 4)}  top-5 overlap: {round(lg.top5, 4)}")
        limits = ", ".join(f"{k} {v:g}" for k, v in self.thresholds.limits().items())
        lines.append(f"PASS ({self.kind}: {limits})" if self.passed else
                     f"FAIL ({self.kind}): " + "; ".join(self.failures))
        return "\n".join(lines)


def _num(x: float, digits: int = 4) -> str:
    return "0" if x == 0 else f"{x:.{digits}g}"


# -- metrics -----------------------------------------------------------------------------------------
def compare_hidden(layer: int, a: torch.Tensor, b: torch.Tensor) -> LayerStats:
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm().item(), b.norm().item()
    diff = (a - b).norm().item()
    return LayerStats(layer, (a - b).abs().max().item(), diff / na if na else float(diff != 0),
                      (a @ b).item() / (na * nb) if na and nb else float(na == nb))


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> LogitStats:
    """Max abs difference, KL(A||B) in float64 (mean over positions), top-1 and top-5 agreement."""
    la = torch.log_softmax(a.double(), dim=-1)
    lb = torch.log_softmax(b.double(), dim=-1)
    kl = (la.exp() * (la - lb)).sum(-1).mean().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    k = min(5, a.shape[-1])
    ta, tb = a.topk(k, dim=-1).indices, b.topk(k, dim=-1).indices
    top5 = (ta[..., :, None] == tb[..., None, :]).any(-1).double().mean().item()
    return LogitStats((a.double() - b.double()).abs().max().item(), max(kl, 0.0), top1, top5)


def _judge(th: Thresholds, hidden: list[LayerStats], lg: LogitStats) -> list[str]:
    out = []
    if th.max_abs is not None and not lg.max_abs <= th.max_abs:
        out.append(f"logits max abs diff {lg.max_abs:.4g} > {th.max_abs:g}")
    if th.max_kl is not None and not lg.kl <= th.max_kl:
        out.append(f"KL(A||B) {lg.kl:.4g} > {th.max_kl:g}")
    if th.min_top1 is not None and not lg.top1 >= th.min_top1:
        out.append(f"top-1 agreement {lg.top1:.4g} < {th.min_top1:g}")
    if th.min_top5 is not None and not lg.top5 >= th.min_top5:
        out.append(f"top-5 overlap {lg.top5:.4g} < {th.min_top5:g}")
    if th.max_hidden_rel is not None:
        bad = [s for s in hidden if not s.rel_l2 <= th.max_hidden_rel]
        if bad:
            out.append(f"hidden state rel L2 {bad[0].rel_l2:.4g} > {th.max_hidden_rel:g} from layer {bad[0].layer}"
                       f" ({len(bad)} of {len(hidden)} layers)")
    return out


# -- thresholds ------------------------------------------------------------------------------------
def infer_kind(reader_a: CheckpointReader, reader_b: CheckpointReader, layer: int | None = None,
               dtype: str = "bf16") -> str:
    """The conversion kind that relates two checkpoints.

    ``fp8`` if either stores fp8 tensors; ``q8_0`` if either is a GGUF with q8_0 or f16 tensors; ``int8`` if either stores int8 that is not the original int8
    with its row-block scales (its reader cannot hand back a :class:`QInt8` for the row-blocked
    attention output weight of ``layer``), or, in an fp32 run, if one side has the original int8 and
    the other its bf16 dequantization (equal in a bf16 run, 1 bf16 rounding apart in fp32); else ``exact``.
    """
    schemes = [{str(t.quant.get("scheme", "")).lower() for t in r.stored() if t.quant} for r in (reader_a, reader_b)]
    if any("fp8" in s for side in schemes for s in side):
        return "fp8"
    # GGUF q8_0 (the float embedding is ordinary q8_0 even where the weights keep the original int8), and
    # f16 (one fp16 rounding of every weight, which a bf16 run rounds again): not bit-exact
    if any("q8_0" in s for side in schemes for s in side) or any(
            r.format == "gguf" and any(t.dtype == "F16" for t in r.stored()) for r in (reader_a, reader_b)):
        return "q8_0"
    probe_layer = layer if layer is not None else next(iter(reader_a.layers), None)
    if probe_layer is None:
        return "exact"
    # the row-blocked output projection and a per-column weight: a re-quantized int8 can look like
    # row blocks when its group size equals the block (tiny models), never like one scale per column
    probes = [f"{LAYER_PREFIX}{probe_layer}/multi_head_attention/{m}/w" for m in ("linear", "query")]
    original = [all(r.is_quantized_int8(p) for p in probes) for r in (reader_a, reader_b)]
    if any(any("int8" in s for s in side) and not orig for side, orig in zip(schemes, original)):
        return "int8"
    if dtype == "fp32" and original[0] != original[1]:
        other = reader_b if original[0] else reader_a
        if not (other.format == "gguf" and all(t.dtype == "F32" for t in other.stored())):   # f32 GGUF: int8*scale
            return "int8"
    return "exact"


def resolve_thresholds(expect, reader_a=None, reader_b=None, layer: int | None = None, dtype: str = "bf16",
                       **overrides) -> tuple[str, Thresholds]:
    """``expect``: a kind of :data:`THRESHOLDS`, ``auto`` (inferred from the readers) or a
    :class:`Thresholds`; ``overrides`` (max_abs=..., max_kl=..., ...) replace single limits."""
    if isinstance(expect, Thresholds):
        return "custom", expect.replace(**overrides)
    kind = str(expect or "auto").lower()
    if kind == "auto":
        if reader_a is None or reader_b is None:
            raise ValueError("expect='auto' needs both readers")
        kind = infer_kind(reader_a, reader_b, layer, dtype)
        if dtype == "fp32" and f"{kind}-fp32" in THRESHOLDS:   # a lossy kind's tighter float32 row
            kind = f"{kind}-fp32"
    if kind not in THRESHOLDS:
        raise ValueError(f"unknown parity kind {expect!r}; choose one of auto, {', '.join(KINDS)}")
    return kind, THRESHOLDS[kind].replace(**overrides)


def _check_configs(a: CheckpointReader, b: CheckpointReader) -> None:
    da, db = dataclasses.asdict(a.config), dataclasses.asdict(b.config)
    diff = [f"{k}: {da[k]} vs {db[k]}" for k in da if k != "num_layers" and da[k] != db[k]]
    if diff:
        raise ParityError("the two checkpoints are different models: " + ", ".join(diff))


# -- the run ---------------------------------------------------------------------------------------
def run_parity(reader_a: CheckpointReader, reader_b: CheckpointReader, tokens, *, layers="0-1",
               device="auto", dtype: str = "bf16", thresholds="exact", overrides: dict | None = None,
               semantics_a: Semantics = Semantics(), semantics_b: Semantics = Semantics(),
               progress: bool = False, keep_logits: bool = True) -> ParityReport:
    """Run both checkpoints on ``tokens`` [B, T] over ``layers`` and compare.

    ``layers``: a list, a range text (``"0-1,5"``) or ``"all"``; run in numeric order.
    ``thresholds``: a kind (``exact``, ``int8``, ``fp8``), ``auto`` (inferred from the readers), or a
    :class:`Thresholds`; ``overrides`` (``max_abs``, ``max_kl``, ...) replace single limits of it.
    Returns a :class:`ParityReport`; call ``.check()`` on it to raise :class:`ParityError` on failure.
    """
    start = time.perf_counter()
    _check_configs(reader_a, reader_b)
    layer_list = resolve_layers(layers, reader_a)
    for name, reader in (("A", reader_a), ("B", reader_b)):
        missing = sorted(set(layer_list) - set(reader.layers))
        if missing:
            raise MissingTensorError(f"checkpoint {name} lacks layers {_ranges(missing)}; "
                                     f"it holds {_ranges(reader.layers)}", path=reader.path)
    kind, th = resolve_thresholds(thresholds, reader_a, reader_b, layer_list[0] if layer_list else None, dtype,
                                  **(overrides or {}))
    sides = {"A": ReferenceForward(reader_a, device=device, dtype=dtype, semantics=semantics_a),
             "B": ReferenceForward(reader_b, device=device, dtype=dtype, semantics=semantics_b)}
    dev = sides["A"].device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    tok = sides["A"].check_tokens(tokens)
    seconds = {"A": 0.0, "B": 0.0}
    hidden: list[LayerStats] = []
    bar = tqdm(total=2 * (len(layer_list) + 2), desc="parity", unit="stage", disable=not progress,
               file=sys.stderr, leave=False)

    def stage(label, fn):
        out = {}
        for side, fwd in sides.items():
            bar.set_postfix_str(f"{label} {side}")
            t0 = time.perf_counter()
            out[side] = fn(fwd, side)
            seconds[side] += time.perf_counter() - t0
            bar.update()
        return out

    try:
        with torch.inference_mode(), exact_matmul():
            h = stage("embed", lambda f, s: f.embed(tok))
            for layer in layer_list:
                h = stage(f"layer {layer}", lambda f, s: f.layer(h[s], tok, layer))
                hidden.append(compare_hidden(layer, h["A"].cpu(), h["B"].cpu()))
            logits = stage("head", lambda f, s: f.head(h[s]).cpu())
    finally:
        bar.close()
    lg = compare_logits(logits["A"], logits["B"])
    profile = {"wall_s": time.perf_counter() - start, "wall_s_a": seconds["A"], "wall_s_b": seconds["B"],
               **peak_memory(dev)}
    return ParityReport(
        kind=kind, thresholds=th, layers=layer_list, device=str(dev), dtype=dtype,
        tokens=tok.cpu().tolist(), hidden=hidden, logits=lg, failures=_judge(th, hidden, lg), profile=profile,
        a=_side(reader_a, semantics_a), b=_side(reader_b, semantics_b),
        logits_a=logits["A"] if keep_logits else None, logits_b=logits["B"] if keep_logits else None)


def run_engine_parity(reader_a: CheckpointReader, path_b, tokens, engine: str, *, device="auto", dtype: str = "bf16",
                      thresholds="exact", overrides: dict | None = None, keep_logits: bool = True,
                      engine_options: dict | None = None) -> ParityReport:
    """Our reference forward on A against ``engine`` (a name of :data:`grokconv.engines.ENGINES`) on B.

    The engine runs every layer checkpoint B holds, so A runs the same layers. Side B has logits only:
    the per-layer hidden-state comparison is absent (the report says so) and the thresholds judge the
    logits. Raises :class:`~grokconv.errors.EngineUnavailableError` when the engine's library is missing.
    What the engine computes differently whatever the checkpoint says (``engines.engine_semantics``) is
    switched on in the reference on A, and listed in the report; an engine that returns log-probs is
    compared with A's log-softmax. ``engine_options`` go to the engine (vllm: ``python``).
    """
    from .engines import ENGINES, engine_logits, engine_semantics
    from .formats.base import open_checkpoint
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
    start = time.perf_counter()
    with open_checkpoint(path_b, strict=False) as reader_b:
        _check_configs(reader_a, reader_b)
        layer_list = list(reader_b.layers)
        missing = sorted(set(layer_list) - set(reader_a.layers))
        if missing:
            raise MissingTensorError(f"checkpoint A lacks layers {_ranges(missing)}, which B holds and the engine "
                                     f"runs", path=reader_a.path)
        if layer_list != list(range(len(layer_list))):
            raise MissingTensorError(f"an engine runs a model of layers 0..k-1; B holds layers {_ranges(layer_list)}",
                                     path=reader_b.path, hint="export a slice that starts at layer 0 (--layers 0-1)")
        kind, th = resolve_thresholds(thresholds, reader_a, reader_b, layer_list[0] if layer_list else None, dtype,
                                      **(overrides or {}))
        side_b = {"path": str(reader_b.path), "format": reader_b.format}
    sem, logprobs = engine_semantics(engine, dtype)
    fwd = ReferenceForward(reader_a, device=device, dtype=dtype, semantics=sem)
    tok = fwd.check_tokens(tokens)
    t0 = time.perf_counter()   # the engine first: a missing library fails before the reference has run
    try:
        raw = engine_logits(engine, path_b, tok.cpu().numpy(), dtype=dtype, **(engine_options or {}))
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("grokconv.engines."):
            raise
        raise EngineUnavailableError(f"engine {engine!r} is not part of this grokconv ({e.name} is missing)") from None
    logits_b = torch.from_numpy(np.ascontiguousarray(raw))
    t1 = time.perf_counter()
    with torch.inference_mode(), exact_matmul():
        h = fwd.embed(tok)
        for layer in layer_list:
            h = fwd.layer(h, tok, layer)
        logits_a = fwd.head(h).cpu()
        if logprobs:
            logits_a = torch.log_softmax(logits_a.double(), dim=-1).float()
    t2 = time.perf_counter()
    if logits_b.shape != logits_a.shape:
        raise ParityError(f"engine {engine!r} returned logits of shape {tuple(logits_b.shape)}, "
                          f"the reference {tuple(logits_a.shape)}")
    lg = compare_logits(logits_a, logits_b.to(torch.float32))
    side_b["engine_version"] = _engine_version(engine)
    notes = [f"side B is engine {engine!r}, which returns logits only: the per-layer hidden states are not "
             f"compared (limits on them do not apply)"]
    if not sem.is_reference:
        notes.append(f"the reference on A computes what {engine} does whatever the checkpoint says: "
                     + ", ".join(f"{k}={v}" for k, v in sem.changes().items()))
    if logprobs:
        notes.append(f"{engine} returns log-probs: A's logits are log-softmaxed (max abs compares log-probs)")
    profile = {"wall_s": time.perf_counter() - start, "wall_s_a": t2 - t1, "wall_s_b": t1 - t0,
               **peak_memory(fwd.device)}
    return ParityReport(
        kind=kind, thresholds=th, layers=layer_list, device=str(fwd.device), dtype=dtype, tokens=tok.cpu().tolist(),
        hidden=[], logits=lg, failures=_judge(th, [], lg), profile=profile, a=_side(reader_a, sem),
        b=side_b, engine=engine, notes=notes, logits_a=logits_a if keep_logits else None,
        logits_b=logits_b if keep_logits else None)


def _engine_version(engine: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    from .engines import engine_module
    ran = getattr(engine_module(engine), "last_version", None)   # an engine run in another interpreter
    if ran:
        return ran
    dist = {"transformers": "transformers", "megatron-core": "megatron-core", "llama.cpp": "llama_cpp_python"}.get(engine)
    try:
        return version(dist) if dist else None
    except PackageNotFoundError:
        return None


def _side(reader: CheckpointReader, sem: Semantics) -> dict:
    out = {"path": str(reader.path), "format": reader.format}
    if not sem.is_reference:
        out["semantics"] = sem.changes()
    return out


# -- tokens ----------------------------------------------------------------------------------------
def random_tokens(vocab_size: int, batch: int, seq_len: int, seed: int = 0, pad_token: int = 0) -> torch.Tensor:
    """A seeded [batch, seq_len] batch of ids in 1..vocab-1 (no pad token, so no position is masked)."""
    if batch < 1 or seq_len < 1:
        raise ValueError("batch and seq-len must be at least 1")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size - 1, (batch, seq_len), generator=g)
    return ids + (ids >= pad_token).long()   # skip the pad id


def parse_tokens(text: str) -> torch.Tensor:
    """``"1,2,3"`` -> [[1, 2, 3]]; sequences of equal length may be separated by ``;``."""
    try:
        rows = [[int(x) for x in row.replace(" ", "").split(",") if x] for row in text.split(";") if row.strip()]
    except ValueError:
        raise ValueError(f"--tokens must be comma-separated integers (';' between sequences), got {text!r}") from None
    if not rows or any(len(r) != len(rows[0]) or not r for r in rows):
        raise ValueError("--tokens: give one or more non-empty sequences of equal length")
    return torch.tensor(rows, dtype=torch.long)


def encode_text(text: str, reader: CheckpointReader) -> torch.Tensor:
    """Encode with the SentencePiece ``tokenizer.model`` beside the checkpoint (no BOS, as runners.py)."""
    from .tokenizer import TOKENIZER_FILE, find_tokenizer
    model = find_tokenizer(reader.path)
    if model is None:
        where = reader.path if reader.path.is_dir() else reader.path.parent
        raise GrokconvError(f"--text needs a tokenizer.model beside checkpoint A (looked for {where / TOKENIZER_FILE})",
                            hint="copy tokenizer.model from github.com/xai-org/grok-1 there, or pass --tokens")
    try:
        import sentencepiece
    except ImportError:
        raise GrokconvError("--text needs the sentencepiece package, which is not installed",
                            hint="pip install sentencepiece, or pass --tokens") from None
    ids = sentencepiece.SentencePieceProcessor(model_file=str(model)).encode(text)
    if not ids:
        raise ValueError("--text encodes to no tokens")
    return torch.tensor([ids], dtype=torch.long)
