"""Train the ``tiny-trained`` preset: a small Grok-1 that has learned English, in the release's format.

The model is the architecture of ``grokconv/forward.py`` (and ``model.py``): embeddings times
``embedding_multiplier_scale``, sandwich RMSNorms, rotate-half RoPE, grouped-query attention with the
``30 tanh(x / 30)`` logit cap, 8 experts with a softmax router and top-2 gates that are not
renormalised, tanh-GELU gated experts, tied output embeddings times ``output_multiplier_scale``. It
trains in float32 on CPU and is written as absmax int8 with bf16 scales (8 row blocks for the
attention output and expert down projections) through :func:`grokconv.formats.jax.write_param_file`.

Data: CPython's pydoc topics (``pydoc_data.topics``, the text of ``help('topic')``), split by topic:
every tenth topic (sorted by name, starting at the fourth) is held out and never seen by the tokenizer
or the model. The tokenizer is a SentencePiece BPE model trained on the training topics only, with the
settings of Grok-1's (byte fallback, identity normalisation, split digits, ids 0-3 = PAD BOS EOS UNK).

Deterministic: one torch thread, seeded initialisation, a fixed window order from a seeded numpy
generator, a deterministic tokenizer trainer (one thread, no sampling). On the same torch build and
CPU kernel family the same command gives the same bytes (``--check`` compares them with the committed
checkpoint); elsewhere float32 kernels may round differently and the figures agree only closely.

    python tools/train_tiny.py --out build/tiny-trained            # train, export, pack, report
    python tools/train_tiny.py --out build/tiny-trained --check    # ... and compare with the package
    python tools/train_tiny.py --out build/tiny-trained --commit   # ... and replace the package's copy
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grokconv.config import CONFIG_FILE, GrokConfig  # noqa: E402
from grokconv.formats.jax import CKPT_DIR, write_param_file  # noqa: E402
from grokconv.quant.rowblocks import quantize_rowblocks  # noqa: E402
from grokconv.schema import LAYER_PREFIX, param_specs  # noqa: E402
from grokconv.tensor import QInt8, from_torch  # noqa: E402

PRESET = "tiny-trained"
PRESET_DIR = ROOT / "grokconv" / "presets"
ARCHIVE = PRESET_DIR / f"{PRESET}.tar.xz"
MANIFEST = PRESET_DIR / f"{PRESET}.json"
CONFIG = ROOT / "grokconv" / "configs" / f"{PRESET}.json"

# training settings (part of what makes the bytes: change them and the committed checkpoint changes)
SETTINGS = dict(seed=1234, steps=600, batch=16, seq_len=64, lr=3e-3, min_lr_frac=0.1, warmup=30,
                weight_decay=0.1, betas=(0.9, 0.95), clip=1.0, aux_loss=0.01, router_entropy=0.05, eval_every=200,
                heldout_every=10, heldout_offset=3, tokenizer_vocab=1024)
PROBE_STEPS = 3   # the reproduction test re-runs this many steps and compares the parameter hash


# -- data ------------------------------------------------------------------------------------------
def topics_split(settings=SETTINGS) -> tuple[dict, dict]:
    """``(train, heldout)``: topic name -> text, split by position in the sorted topic names."""
    from pydoc_data.topics import topics
    names = sorted(topics)
    held = {n for i, n in enumerate(names) if i % settings["heldout_every"] == settings["heldout_offset"]}
    return ({n: topics[n] for n in names if n not in held}, {n: topics[n] for n in names if n in held})


def text_sha256(docs: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(docs):
        h.update(name.encode() + b"\0" + docs[name].encode() + b"\0")
    return h.hexdigest()


def train_tokenizer(docs: dict, out: Path, vocab: int) -> Path:
    """SentencePiece BPE on the training topics, with Grok-1's tokenizer settings."""
    import sentencepiece as spm
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "train.txt"
        corpus.write_text("\n".join(line for name in sorted(docs) for line in docs[name].splitlines()
                                    if line.strip()) + "\n")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "tok"), vocab_size=vocab, model_type="bpe",
            byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
            character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]",
            bos_piece="[BOS]", eos_piece="[EOS]", unk_piece="[UNK]", num_threads=1,
            shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2)
        shutil.copy(Path(tmp) / "tok.model", out)
    return out


def encode_docs(docs: dict, tokenizer: Path, eos: int) -> np.ndarray:
    """Every topic encoded (no BOS, as runners.py), each followed by EOS, in sorted order."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    ids = []
    for name in sorted(docs):
        ids.extend(sp.encode(docs[name]))
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def heldout_batches(tokenizer: Path, n: int, batch: int = 2, seq_len: int = 32, settings=SETTINGS) -> list:
    """``n`` token batches [batch, seq_len] (int64) of held-out text: consecutive windows over the held-out
    topics (sorted by name), never seen in training. For parity runs and tests."""
    _, held = topics_split(settings)
    ids = encode_docs(held, tokenizer, eos=2)
    need = n * batch * seq_len
    if len(ids) < need:
        raise ValueError(f"held-out text has {len(ids)} tokens, {need} asked for")
    return [torch.as_tensor(ids[i * batch * seq_len:(i + 1) * batch * seq_len].reshape(batch, seq_len))
            for i in range(n)]


# -- the model (float32, canonical [in, out] layouts) -------------------------------------------------
def init_params(cfg: GrokConfig, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    D, F_, E, L = cfg.emb_size, cfg.ffn_size, cfg.num_experts, cfg.num_layers

    def normal(*shape, std):
        return (torch.randn(*shape, generator=g) * std).requires_grad_()

    p = {"language_model/in_out_embed/embeddings": normal(cfg.vocab_size, D, std=1 / math.sqrt(D)),
         "language_model/rms_norm/scale": torch.ones(D, requires_grad=True)}
    post = 1 / math.sqrt(2 * L)
    for layer in range(L):
        pre = f"{LAYER_PREFIX}{layer}/"
        p[pre + "multi_head_attention/query/w"] = normal(D, cfg.q_size, std=1 / math.sqrt(D))
        p[pre + "multi_head_attention/key/w"] = normal(D, cfg.kv_size, std=1 / math.sqrt(D))
        p[pre + "multi_head_attention/value/w"] = normal(D, cfg.kv_size, std=1 / math.sqrt(D))
        p[pre + "multi_head_attention/linear/w"] = normal(cfg.q_size, D, std=1 / math.sqrt(cfg.q_size))
        p[pre + "moe/linear/w"] = normal(E, D, F_, std=1 / math.sqrt(D))
        p[pre + "moe/linear_v/w"] = normal(E, D, F_, std=1 / math.sqrt(D))
        p[pre + "moe/linear_1/w"] = normal(E, F_, D, std=1 / math.sqrt(F_))
        p[pre + "router/w"] = normal(D, E, std=0.1 / math.sqrt(D))
        for norm, value in (("rms_norm", 1.0), ("rms_norm_1", post), ("rms_norm_2", 1.0), ("rms_norm_3", post)):
            p[pre + f"{norm}/scale"] = torch.full((D,), value, requires_grad=True)
    assert set(p) == {s.name for s in param_specs(cfg)}
    return p


def _rms(x, scale, eps):
    return scale * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _rope(x, base):
    B, T, H, K = x.shape
    inv = 1.0 / (base ** (torch.arange(0, K, 2, dtype=torch.float32) / K))
    phase = torch.arange(T, dtype=torch.float32)[:, None] * inv[None]
    phase = torch.cat([phase, phase], -1)[None, :, None, :]
    rot = torch.cat([-x[..., K // 2:], x[..., :K // 2]], -1)
    return x * torch.cos(phase) + rot * torch.sin(phase)


def model_forward(p: dict, cfg: GrokConfig, tokens: torch.Tensor):
    """float32 logits [B, T, V] and the router losses (mean over layers): Switch-style load balancing,
    and the mean entropy of each token's router distribution (penalised so that routing is decisive: a
    router that hesitates between experts turns any small weight change into a different expert choice,
    which no trained production MoE does)."""
    B, T = tokens.shape
    D, E, k = cfg.emb_size, cfg.num_experts, cfg.num_selected_experts
    Hq, Hkv, K = cfg.num_q_heads, cfg.num_kv_heads, cfg.key_size
    emb = p["language_model/in_out_embed/embeddings"]
    h = emb[tokens] * cfg.embedding_multiplier_scale
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    aux, ent = 0.0, 0.0
    for layer in range(cfg.num_layers):
        w = lambda slot: p[f"{LAYER_PREFIX}{layer}/{slot}"]  # noqa: E731
        x = _rms(h, w("rms_norm/scale"), cfg.rms_norm_eps)
        q = _rope((x @ w("multi_head_attention/query/w")).view(B, T, Hq, K), cfg.rope_base)
        kk = _rope((x @ w("multi_head_attention/key/w")).view(B, T, Hkv, K), cfg.rope_base)
        v = (x @ w("multi_head_attention/value/w")).view(B, T, Hkv, K)
        kk, v = kk.repeat_interleave(Hq // Hkv, 2), v.repeat_interleave(Hq // Hkv, 2)
        logits = torch.einsum("bthd,bThd->bhtT", q, kk) * cfg.attn_output_multiplier
        logits = cfg.max_attn_value * torch.tanh(logits / cfg.max_attn_value)
        logits = logits.masked_fill(~causal, -1e30)
        a = torch.einsum("bhtT,bThd->bthd", torch.softmax(logits, -1), v).reshape(B, T, Hq * K)
        h = h + _rms(a @ w("multi_head_attention/linear/w"), w("rms_norm_1/scale"), cfg.rms_norm_eps)
        x = _rms(h, w("rms_norm_2/scale"), cfg.rms_norm_eps).reshape(B * T, D)
        probs = torch.softmax(x @ w("router/w"), -1)
        gate, idx = torch.topk(probs, k, -1)
        out = torch.zeros_like(x)
        for e in range(E):
            rows, slot = torch.nonzero(idx == e, as_tuple=True)
            if rows.numel() == 0:
                continue
            xe = x[rows]
            y = (F.gelu(xe @ w("moe/linear/w")[e], approximate="tanh") * (xe @ w("moe/linear_v/w")[e])) \
                @ w("moe/linear_1/w")[e]
            out = out.index_add(0, rows, gate[rows, slot, None] * y)
        frac = torch.bincount(idx.reshape(-1), minlength=E).float() / idx.numel()
        aux = aux + E * (frac * probs.mean(0)).sum()
        ent = ent - (probs * torch.log(probs + 1e-9)).sum(-1).mean()
        h = h + _rms(out.view(B, T, D), w("rms_norm_3/scale"), cfg.rms_norm_eps)
    h = _rms(h, p["language_model/rms_norm/scale"], cfg.rms_norm_eps)
    return (h @ emb.T) * cfg.output_multiplier_scale, (aux / cfg.num_layers, ent / cfg.num_layers)


def params_sha256(p: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(p):
        h.update(name.encode())
        h.update(p[name].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def windows(n_tokens: int, steps: int, batch: int, seq_len: int, seed: int) -> np.ndarray:
    """[steps, batch] start offsets of (seq_len + 1)-token training windows: the fixed data order."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_tokens - seq_len - 1, size=(steps, batch))


def lr_at(step: int, s=SETTINGS) -> float:
    if step < s["warmup"]:
        return s["lr"] * (step + 1) / s["warmup"]
    t = (step - s["warmup"]) / max(1, s["steps"] - s["warmup"])
    return s["lr"] * (s["min_lr_frac"] + (1 - s["min_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def eval_loss(p, cfg, ids: np.ndarray, seq_len: int) -> float:
    """Mean next-token cross-entropy (nats) over the consecutive whole windows of ``ids``."""
    n = (len(ids) - 1) // seq_len
    starts = np.arange(n) * seq_len
    total = 0.0
    for b in range(0, n, 32):
        chunk = torch.as_tensor(ids[starts[b:b + 32, None] + np.arange(seq_len + 1)[None]])
        logits, _ = model_forward(p, cfg, chunk[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, cfg.vocab_size), chunk[:, 1:].reshape(-1), reduction="sum").item()
    return total / (n * seq_len)


def train(cfg: GrokConfig, ids: np.ndarray, settings=SETTINGS, *, steps: int | None = None,
          heldout: np.ndarray | None = None, log=print) -> tuple[dict, dict]:
    """Train from the seeded initialisation for ``steps`` (default: all); returns (params, history)."""
    s = settings
    steps = s["steps"] if steps is None else steps
    torch.manual_seed(s["seed"])
    p = init_params(cfg, s["seed"])
    decay = [t for n, t in p.items() if t.ndim >= 2 and "router" not in n]
    rest = [t for n, t in p.items() if not (t.ndim >= 2 and "router" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=s["lr"], betas=s["betas"],
                            foreach=False)
    starts = windows(len(ids), s["steps"], s["batch"], s["seq_len"], s["seed"])
    offs = np.arange(s["seq_len"] + 1)
    hist = {"loss": [], "heldout": {}, "probe_sha256": None}
    t0 = time.perf_counter()
    for step in range(steps):
        batch = torch.as_tensor(ids[starts[step][:, None] + offs[None]])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        logits, (aux, ent) = model_forward(p, cfg, batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + s["aux_loss"] * aux + s["router_entropy"] * ent).backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), s["clip"], foreach=False)
        opt.step()
        hist["loss"].append(round(loss.detach().item(), 6))
        if step + 1 == PROBE_STEPS:
            hist["probe_sha256"] = params_sha256(p)
        if heldout is not None and ((step + 1) % s["eval_every"] == 0 or step + 1 == steps):
            hist["heldout"][step + 1] = round(eval_loss(p, cfg, heldout, s["seq_len"]), 4)
        if log and (step % 50 == 0 or step + 1 == steps):
            el = time.perf_counter() - t0
            extra = f" held-out {hist['heldout'][step + 1]:.3f}" if (step + 1) in hist["heldout"] else ""
            log(f"step {step + 1}/{steps} loss {loss.detach().item():.4f} aux {aux.detach().item():.3f} router entropy {ent.detach().item():.3f} lr {lr_at(step, s):.2e} "
                f"{el:.0f}s{extra}")
    hist["train_seconds"] = round(time.perf_counter() - t0, 1)
    return p, hist


# -- export ----------------------------------------------------------------------------------------
def export(p: dict, cfg: GrokConfig, tokenizer: Path, out: Path) -> Path:
    """The release's format: absmax int8 weights with bf16 scales (row-blocked where the release has
    them), float32 embeddings, norms and routers; ``grokconv-config.json`` and ``tokenizer.model``."""
    out = Path(out)
    d = out / CKPT_DIR
    d.mkdir(parents=True, exist_ok=True)
    cfg.save(out / CONFIG_FILE)
    shutil.copy(tokenizer, out / "tokenizer.model")
    for spec in param_specs(cfg):
        t = p[spec.name].detach().to(torch.float32)
        if spec.kind == "qw8":
            q, s = quantize_rowblocks(t, spec.scale_groups)
            value = QInt8(q.numpy(), from_torch(s))
        else:
            value = np.ascontiguousarray(t.numpy(), dtype=np.float32)
        write_param_file(d / spec.file, spec, value)
    return out


def evaluate(out: Path, ids: np.ndarray, held: np.ndarray, windows: int = 96, seq_len: int = 64) -> dict:
    """The exported checkpoint through grokconv's reference forward (bf16, int8 weights): next-token loss
    on the first ``windows`` windows of held-out and of training text, top-1 accuracy, how often the top
    guess is the input token itself, and the copy-input accuracy."""
    from grokconv.formats.base import open_checkpoint
    from grokconv.forward import forward
    reader = open_checkpoint(out)
    res = {}
    for label, data in (("heldout", held), ("train", ids)):
        n = min(windows, (len(data) - 1) // seq_len)
        nll = hit = echo = copy = count = 0
        for b in range(0, n, 8):
            rows = np.arange(b, min(n, b + 8))[:, None] * seq_len + np.arange(seq_len)[None]
            tok = torch.as_tensor(data[rows])
            logits = forward(reader, tok, layers="all", device="cpu").logits.double()
            lp = torch.log_softmax(logits[:, :-1], -1)
            tgt, cur = tok[:, 1:], tok[:, :-1]
            nll -= lp.gather(-1, tgt[..., None]).sum().item()
            top = logits[:, :-1].argmax(-1)
            hit += (top == tgt).sum().item()
            echo += (top == cur).sum().item()
            copy += (cur == tgt).sum().item()
            count += tgt.numel()
        res[label] = {"tokens": count, "loss": round(nll / count, 4), "top1": round(hit / count, 4),
                      "echo_rate": round(echo / count, 4), "copy_input_top1": round(copy / count, 4)}
    return res


def file_hashes(out: Path) -> dict[str, str]:
    out = Path(out)
    names = [CONFIG_FILE, "tokenizer.model"] + sorted(f"{CKPT_DIR}/{f.name}" for f in (out / CKPT_DIR).iterdir())
    return {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names}


def pack(out: Path, archive: Path) -> str:
    """A deterministic tar.xz of the checkpoint (sorted names, zero times and owners); its sha256."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz", preset=9) as tar:
        for name in file_hashes(out):
            data = (Path(out) / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            tar.addfile(info, io.BytesIO(data))
    archive.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def pieces(source: Path) -> list:
    """(piece, score) of every id of a tokenizer.model, or of the one inside a preset archive."""
    import sentencepiece as spm
    if str(source).endswith(".tar.xz"):
        with tarfile.open(source, "r:xz") as tar:
            sp = spm.SentencePieceProcessor(model_proto=tar.extractfile("tokenizer.model").read())
    else:
        sp = spm.SentencePieceProcessor(model_file=str(source))
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


def environment() -> dict:
    import sentencepiece
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "sentencepiece": sentencepiece.__version__,
            "numpy": np.__version__, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / PRESET)
    ap.add_argument("--steps", type=int, help="stop early (a shorter run: its bytes differ from the preset's)")
    ap.add_argument("--check", action="store_true", help="compare every checkpoint file's sha256 (the tokenizer's pieces) with the committed manifest")
    ap.add_argument("--commit", action="store_true", help="write the archive and manifest into grokconv/presets/")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = GrokConfig.load(CONFIG)
    train_docs, held_docs = topics_split()
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(train_docs, Path(tmp) / "tokenizer.model", SETTINGS["tokenizer_vocab"])
        ids = encode_docs(train_docs, tok, cfg.eos_token)
        held = encode_docs(held_docs, tok, cfg.eos_token)
        print(f"train: {len(train_docs)} topics, {len(ids)} tokens; held out: {len(held_docs)} topics, "
              f"{len(held)} tokens ({', '.join(sorted(held_docs))})")
        p, hist = train(cfg, ids, steps=args.steps, heldout=held)
        f32_train = eval_loss(p, cfg, ids[:len(held)], SETTINGS["seq_len"])
        export(p, cfg, tok, out)
    hashes = file_hashes(out)
    bf16 = evaluate(out, ids, held)
    n_params = sum(int(t.numel()) for t in p.values())
    info = {
        "preset": PRESET, "settings": SETTINGS, "steps_run": len(hist["loss"]), "environment": environment(),
        "data": {"source": "pydoc_data.topics", "train_topics": len(train_docs), "heldout_topics": sorted(held_docs),
                 "train_tokens": int(len(ids)), "heldout_tokens": int(len(held)),
                 "train_text_sha256": text_sha256(train_docs), "heldout_text_sha256": text_sha256(held_docs)},
        "params": n_params, "checkpoint_bytes": sum((out / n).stat().st_size for n in hashes),
        "train_seconds": hist["train_seconds"], "probe_steps": PROBE_STEPS, "probe_sha256": hist["probe_sha256"],
        "probe_loss": hist["loss"][:PROBE_STEPS], "final_train_loss": hist["loss"][-1],
        "f32_loss": {"train_sample": round(f32_train, 4), "heldout": hist["heldout"]},
        "bf16_int8": bf16, "bf16_heldout_loss": bf16["heldout"]["loss"],
        "files": hashes,
    }
    (out.parent / f"{out.name}-training.json").write_text(json.dumps({**info, "loss": hist["loss"]}, indent=1))
    print(f"{n_params} parameters, {info['checkpoint_bytes']} bytes, {hist['train_seconds']} s of training; "
          f"loss {hist['loss'][-1]:.4f} (last batch), held-out {hist['heldout']}")
    if args.check:
        committed = json.loads(MANIFEST.read_text())
        # tokenizer.model's bytes also hold the trainer's temporary input path: compare its pieces
        bad = [n for n, h in hashes.items() if committed["files"].get(n) != h and n != "tokenizer.model"]
        if pieces(out / "tokenizer.model") != pieces(ARCHIVE):
            bad.append("tokenizer.model")
        if bad or set(hashes) != set(committed["files"]):
            print(f"DIFFERENT from the committed checkpoint: {len(bad)} files, first {bad[:3]}")
            return 1
        print("identical to the committed checkpoint, file for file")
    if args.commit:
        PRESET_DIR.mkdir(exist_ok=True)
        info["archive"] = ARCHIVE.name
        info["archive_sha256"] = pack(out, ARCHIVE)
        MANIFEST.write_text(json.dumps(info, indent=1) + "\n")
        print(f"wrote {ARCHIVE} ({ARCHIVE.stat().st_size} bytes) and {MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
