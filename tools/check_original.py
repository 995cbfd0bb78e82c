"""Does the ORIGINAL Grok-1 code read the trained preset, and has the model learned English?

Runs xai-org/grok-1's own ``model.py`` / ``checkpoint.py`` / ``runners.py`` (unmodified; pass the path
of a copy, it is not part of grokconv) on CPU with 8 virtual devices and mesh (1, 8), as ``run.py``
does: ``ModelRunner.load_or_init`` -> ``checkpoint.restore`` unpickles the ``ckpt-0`` files grokconv
wrote, and the Haiku forward gives the logits. Then, on text that is not in the training data (a
sentence written for this check and the held-out pydoc topics), it reports the next-token loss per
token against chance (``ln vocab``) and against echoing the input (the best "the next token repeats
this one" predictor), and how often the model's top guess is its own input token.

Needs its own environment (the original pins jax 0.4.25; ``make check-original`` builds it):

    python -m venv .venv-orig && .venv-orig/bin/pip install jax==0.4.25 jaxlib==0.4.25 \\
        dm-haiku==0.0.12 numpy==1.26.4 sentencepiece==0.2.0
    .venv/bin/grokconv synth build/tiny-trained --preset tiny-trained
    .venv-orig/bin/python tools/check_original.py --grok1 PATH/grok-1 --ckpt build/tiny-trained \
        --save-logits build/original-logits.npz
    .venv/bin/python tools/check_original.py --ckpt build/tiny-trained --compare build/original-logits.npz

The last step (grokconv's environment, no jax) runs grokconv's reference forward on the same tokens and
compares its logits with the original code's. ml_dtypes must be <= 0.4: grokconv writes the bf16
scales' dtype with the flags byte of the release's era (80); unpickling that with ml_dtypes >= 0.5
overwrites the flags of the process-wide bfloat16 dtype (64 there), after which jax 0.4.25 refuses
every bfloat16 array ("Value 'bfloat16' with dtype bfloat16 is not a valid JAX array type").

Exit status 0 only if the loss beats chance by the margins below and the model does not echo.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# the original code asserts 8 devices for mesh (1, 8); set before jax is imported
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

SENTENCE = ("When the interpreter reads a file that ends without a newline, the last line is still "
            "treated as a complete logical line, and a syntax error is raised only if the statement "
            "on it is incomplete.")
MAX_LOSS_FRACTION = 0.7    # loss per token must stay below 0.7 x ln(vocab) ...
MAX_ECHO_RATE = 0.2        # ... and the top guess may be the input token itself at most this often


def original_logits(grok1: Path, ckpt: Path, cfgd: dict, sequences: list[list[int]], seq_len: int):
    sys.path.insert(0, str(grok1))
    import haiku as hk
    import jax
    import numpy as np
    from model import LanguageModelConfig, TransformerConfig   # the original's own modules
    from runners import ModelRunner

    assert jax.device_count() == 8, jax.devices()
    lm = LanguageModelConfig(
        vocab_size=cfgd["vocab_size"], pad_token=cfgd["pad_token"], eos_token=cfgd["eos_token"],
        sequence_len=cfgd["sequence_len"], embedding_init_scale=1.0,
        output_multiplier_scale=cfgd["output_multiplier_scale"],
        embedding_multiplier_scale=cfgd["embedding_multiplier_scale"],
        model=TransformerConfig(
            emb_size=cfgd["emb_size"], widening_factor=cfgd["widening_factor"], key_size=cfgd["key_size"],
            num_q_heads=cfgd["num_q_heads"], num_kv_heads=cfgd["num_kv_heads"], num_layers=cfgd["num_layers"],
            attn_output_multiplier=cfgd["attn_output_multiplier"], shard_activations=True,
            num_experts=cfgd["num_experts"], num_selected_experts=cfgd["num_selected_experts"],
            data_axis="data", model_axis="model"))
    runner = ModelRunner(model=lm, bs_per_device=0.125, checkpoint_path=str(ckpt))
    runner.transform_forward = True                       # as InferenceRunner.initialize sets it
    dummy = dict(inputs=np.zeros((1, seq_len), dtype=np.int32), targets=np.zeros((1, seq_len), dtype=np.int32))
    t0 = time.perf_counter()
    runner.initialize(dummy, local_mesh_config=(1, 8), between_hosts_config=(1, 1))
    params = runner.load_or_init(dummy)                   # -> checkpoint.restore of ckpt-0/tensor*_000
    loaded = time.perf_counter() - t0
    with runner.mesh:
        # the forward InferenceRunner builds (hk_forward: runner.model.make(mesh)(tokens)), whole sequence
        lm = hk.transform(lambda t: runner.model.make(mesh=runner.mesh)(t).logits)
        fn = jax.jit(lm.apply)
        out = []
        for seq in sequences:                             # batch 1: the original's quantized Linear needs it
            padded = np.zeros((1, seq_len), dtype=np.int32)
            padded[0, :len(seq)] = seq                    # right-padded with pad 0 (masked as keys)
            out.append(np.asarray(fn(params, None, padded), dtype=np.float32)[0, :len(seq)])
    return out, loaded, time.perf_counter() - t0 - loaded


def figures(logits: list, sequences: list[list[int]], vocab: int) -> dict:
    import numpy as np
    nll, echo, hit, copy_hit, n = 0.0, 0, 0, 0, 0
    for lg, seq in zip(logits, sequences):
        lg = lg[:-1].astype(np.float64)
        tgt, cur = np.asarray(seq[1:]), np.asarray(seq[:-1])
        logp = lg - lg.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll += -logp[np.arange(len(tgt)), tgt].sum()
        top = lg.argmax(-1)
        echo += int((top == cur).sum())
        hit += int((top == tgt).sum())
        copy_hit += int((cur == tgt).sum())
        n += len(tgt)
    # the best echo predictor: p(next = this token) = a, the rest uniform, a fitted to the text itself
    a = min(max(copy_hit / n, 1e-6), 1 - 1e-6)
    copy_loss = -(copy_hit * math.log(a) + (n - copy_hit) * math.log((1 - a) / (vocab - 1))) / n
    loss = nll / n
    return {"tokens_scored": n, "loss_per_token": loss, "perplexity": math.exp(loss), "chance_loss": math.log(vocab),
            "copy_input_loss": copy_loss, "top1_accuracy": hit / n, "copy_input_accuracy": copy_hit / n,
            "echo_rate": echo / n}


def compare(ckpt: Path, npz: Path) -> int:
    """grokconv's reference forward (bf16) on the tokens the original code ran; logits compared."""
    import numpy as np
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from grokconv.formats.base import open_checkpoint
    from grokconv.forward import forward
    data = np.load(npz)
    reader = open_checkpoint(ckpt)
    worst, agree, n = 0.0, 0, 0
    for i in range(len([k for k in data.files if k.startswith("seq")])):
        tok, orig = data[f"tokens{i}"], data[f"seq{i}"]
        ours = forward(reader, torch.as_tensor(tok)[None], layers="all", device="cpu").logits[0].numpy()
        worst = max(worst, float(np.abs(ours - orig).max()))
        agree += int((ours.argmax(-1) == orig.argmax(-1)).sum())
        n += len(tok)
    print(f"grokconv reference forward vs the original code: max abs logit diff {worst:.4g}, "
          f"argmax agreement {agree / n:.4f} over {n} positions")
    return 0 if agree / n >= 0.95 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="the original Grok-1 code on the trained preset")
    ap.add_argument("--grok1", type=Path, help="a copy of github.com/xai-org/grok-1 (model.py ...)")
    ap.add_argument("--compare", type=Path, help="(grokconv's venv) compare --save-logits output with grokconv")
    ap.add_argument("--ckpt", type=Path, required=True, help="grokconv synth OUT --preset tiny-trained")
    ap.add_argument("--text", default=SENTENCE, help="a sentence that is not in the training text")
    ap.add_argument("--heldout-windows", type=int, default=8, help="held-out pydoc topics scored (first window each)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--save-logits", type=Path, help="npz of the original's logits, to compare with grokconv's")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(args.ckpt, args.compare)
    if not args.grok1 or not (args.grok1 / "model.py").is_file():
        ap.error("--grok1 must be a directory holding the original model.py, checkpoint.py, runners.py")
    import numpy as np
    import sentencepiece as spm
    cfgd = json.loads((args.ckpt / "grokconv-config.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(args.ckpt / "tokenizer.model"))
    seq_len = cfgd["sequence_len"]

    from pydoc_data.topics import topics
    names = sorted(topics)
    held = [n for i, n in enumerate(names) if i % 10 == 3]        # tools/train_tiny.py's split
    train_text = "\n".join(topics[n] for n in names if n not in held)
    probe = " ".join(args.text.split()[:6])
    if probe in train_text:
        print(f"error: the sentence's opening words {probe!r} occur in the training text; pick another")
        return 2
    sentence = sp.encode(args.text)[:seq_len]
    windows = [sp.encode(topics[n])[:seq_len] for n in held[:args.heldout_windows]]
    logits, load_s, run_s = original_logits(args.grok1.resolve(), args.ckpt.resolve(), cfgd, [sentence, *windows],
                                            seq_len)
    report = {"checkpoint": str(args.ckpt), "grok1": str(args.grok1), "load_seconds": round(load_s, 1),
              "forward_seconds": round(run_s, 1), "sentence": args.text,
              "sentence_figures": figures(logits[:1], [sentence], cfgd["vocab_size"]),
              "heldout_topics": held[:args.heldout_windows],
              "heldout_figures": figures(logits[1:], windows, cfgd["vocab_size"])}
    if args.save_logits:
        np.savez(args.save_logits, **{f"seq{i}": lg for i, lg in enumerate(logits)},
                 **{f"tokens{i}": np.asarray(s) for i, s in enumerate([sentence, *windows])})
    ok = True
    for key in ("sentence_figures", "heldout_figures"):
        f = report[key]
        good = (f["loss_per_token"] < MAX_LOSS_FRACTION * f["chance_loss"] and f["echo_rate"] <= MAX_ECHO_RATE
                and f["loss_per_token"] < f["copy_input_loss"])
        ok &= good
        print(f"{key.split('_')[0]:>9}: {f['tokens_scored']} tokens, loss {f['loss_per_token']:.3f} nats/token "
              f"(perplexity {f['perplexity']:.1f}); chance {f['chance_loss']:.3f} (perplexity {cfgd['vocab_size']}); "
              f"copy-input {f['copy_input_loss']:.3f}; top-1 {f['top1_accuracy']:.3f} vs copy-input "
              f"{f['copy_input_accuracy']:.3f}; top guess = input token {f['echo_rate']:.3f}  "
              f"{'OK' if good else 'FAIL'}")
    print(f"original code: restore {load_s:.1f} s, forward {run_s:.1f} s, {len(logits)} sequences")
    report["passed"] = bool(ok)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
