import json
from pathlib import Path

import click

from ..engines import ENGINES
from ..errors import GrokconvError
from ..thresholds import KINDS
from ..schema import parse_layers


def _open(path: str, layers_text: str):
    from ..formats.base import open_checkpoint
    """Open a checkpoint requiring only the layers the run needs (a slice checkpoint is fine)."""
    wanted = None if layers_text.strip().lower() == "all" else parse_layers(layers_text, 1 << 30)
    return open_checkpoint(path, layers=wanted)


@click.command("parity")
@click.argument("a", type=click.Path(exists=True))
@click.argument("b", type=click.Path(exists=True))
@click.option("--tokens", "tokens_text", help="Token ids, e.g. 1,2,3 (';' between sequences of equal length).")
@click.option("--text", help="Text to encode with the tokenizer.model beside A (needs sentencepiece).")
@click.option("--batch", type=int, default=1, show_default=True, help="Random batch: sequences.")
@click.option("--seq-len", type=int, default=16, show_default=True, help="Random batch: tokens per sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random batch: seed.")
@click.option("--layers", help="Layers to run, e.g. 0-1,5 or all (default 0-1). With --engine: every layer B holds.")
@click.option("--engine", type=click.Choice(list(ENGINES)), default="reference", show_default=True,
              help="What computes side B: our reference forward, or a real engine on B (an optional extra: "
                   "grokconv[transformers], grokconv[megatron], grokconv[llama-cpp]; vllm: see --engine-python).")
@click.option("--engine-python", type=click.Path(dir_okay=False), envvar="GROKCONV_VLLM_PYTHON",
              help="--engine vllm: an interpreter that has vLLM (vLLM pins its own torch; `make vllm-venv` builds "
                   ".venv-vllm/bin/python). Default: $GROKCONV_VLLM_PYTHON, else vLLM in this process.")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True,
              help="--engine megatron-core on a torch_dist checkpoint: the tensor-parallel size to load it into "
                   "(one gloo process per rank).")
@click.option("--ep", type=click.IntRange(min=1), default=1, show_default=True,
              help="--engine megatron-core on a torch_dist checkpoint: the expert-parallel size to load it into.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="bf16: the reference precision; fp32: everything in float32.")
@click.option("--expect", type=click.Choice(["auto", *KINDS]), default="auto", show_default=True,
              help="Threshold row: exact (lossless), int8 (re-quantized), fp8; auto infers it from the files.")
@click.option("--max-abs", type=float, help="Override: max abs logit difference.")
@click.option("--max-kl", type=float, help="Override: max KL(A||B), mean over positions.")
@click.option("--min-top1", type=float, help="Override: min top-1 agreement.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--save-logits", type=click.Path(dir_okay=False),
              help="Write both logits to an .npz (arrays a and b, float32 [batch, tokens, vocab]).")
@click.option("--profile", is_flag=True, help="Print wall time and peak memory.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def command(a, b, tokens_text, text, batch, seq_len, seed, layers, engine, engine_python, tp, ep, device, dtype, expect,
            max_abs, max_kl, min_top1, json_path, save_logits, profile, progress):
    """Run the reference forward on checkpoints A and B (any formats) and compare them.

    Reports, per layer, the residual stream's max abs difference, relative L2 and cosine, and for the
    logits the max abs difference, KL(A||B), top-1 agreement and top-5 overlap. One layer of weights
    is in memory at a time. Exits non-zero when a threshold of the --expect row is exceeded.

    \b
    grokconv parity ckpt/ converted/ --batch 2 --seq-len 16
    grokconv parity ckpt/ fp8/ --layers all --expect fp8 --json report.json
    grokconv parity ckpt/ ckpt/ --tokens 422,3033,356 --device cpu --dtype fp32 --save-logits l.npz
    grokconv parity ckpt/ hf-export/ --engine transformers     # side B: AutoModelForCausalLM on the export
    grokconv parity hf/ hf/ --engine vllm --engine-python .venv-vllm/bin/python --dtype fp32 --max-abs 1e-3
    grokconv parity ckpt/ mdist/ --engine megatron-core --tp 2 --ep 2   # torch_dist loaded into TP2 x EP2

    With --engine other than reference, side B's logits come from that engine run on B over every layer
    B holds (A runs the same layers); the engine gives no per-layer hidden states, so only the logits
    are compared, against the same thresholds. What the engine computes differently whatever the
    checkpoint says (vLLM: erf GELU, attention output x multiplier, unrounded multipliers) is switched on
    in the reference on A and listed in the report.
    """
    from ..parity import encode_text, parse_tokens, random_tokens, run_engine_parity, run_parity
    if tokens_text and text:
        raise click.UsageError("give --tokens or --text, not both")
    if engine != "reference" and layers is not None:
        raise click.UsageError("--layers does not apply with --engine: the engine runs every layer B holds")
    if (tp, ep) != (1, 1) and engine != "megatron-core":
        raise click.UsageError("--tp / --ep apply to --engine megatron-core (a torch_dist checkpoint's load layout)")
    layers = "0-1" if layers is None else layers
    options = {"python": engine_python} if engine == "vllm" else {"tp": tp, "ep": ep} if engine == "megatron-core" \
        else None
    try:
        reader_a = _open(a, layers if engine == "reference" else "all")
        reader_b = _open(b, layers) if engine == "reference" else None
        if tokens_text:
            tokens = parse_tokens(tokens_text)
        elif text is not None:
            tokens = encode_text(text, reader_a)
        else:
            cfg = reader_a.config
            tokens = random_tokens(cfg.vocab_size, batch, seq_len, seed, cfg.pad_token)
        overrides = dict(max_abs=max_abs, max_kl=max_kl, min_top1=min_top1)
        if engine == "reference":
            report = run_parity(reader_a, reader_b, tokens, layers=layers, device=device, dtype=dtype,
                                thresholds=expect, overrides=overrides, progress=progress)
        else:
            report = run_engine_parity(reader_a, b, tokens, engine, device=device, dtype=dtype, thresholds=expect,
                                       overrides=overrides,
                                       engine_options=options)
    except ValueError as e:
        if isinstance(e, GrokconvError):   # a format error: the CLI prints it with its hint
            raise
        raise click.UsageError(str(e)) from None
    click.echo(report.format())
    if profile:
        p = report.profile
        line = f"profile: wall {p['wall_s']:.2f} s (A {p['wall_s_a']:.2f} s, B {p['wall_s_b']:.2f} s), " \
               f"peak RSS {p['peak_rss_bytes'] / 2**30:.2f} GiB"
        if "peak_gpu_bytes" in p:
            line += f", peak GPU {p['peak_gpu_bytes'] / 2**30:.2f} GiB"
        click.echo(line)
    if json_path:
        from ..formats.atomic import atomic_write_text
        atomic_write_text(Path(json_path), json.dumps(report.to_dict(), indent=1) + "\n")
    if save_logits:
        report.save_logits(save_logits)
    report.check()
