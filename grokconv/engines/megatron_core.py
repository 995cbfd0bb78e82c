"""The ``megatron-core`` engine of ``grokconv parity --engine``: Megatron-Core itself runs the checkpoint.

A Megatron checkpoint written by ``grokconv to-megatron`` is loaded into a Megatron-Core ``GPTModel``
built from the checkpoint's own ``args`` with grokconv's Grok-1 layer spec (``grokconv/mcore``), with
``load_state_dict(strict=True)``: every stored tensor must have a parameter and every parameter a
tensor. Then Megatron-Core's forward gives the logits.

* TP x EP > 1 (PP 1): one process per rank (``torch.multiprocessing``, a gloo group on this
  machine), each loading its own rank file strictly, so that Megatron-Core's tensor and expert
  parallelism (its QKV split, its gate/up split, its expert ownership, its all-reduces) run on the
  shards as written; with sequence parallelism as the checkpoint's ``args`` say (on for TP > 1 with
  MoE) when the sequence length divides by TP, off otherwise (inference is the same either way).
* PP > 1 (or a virtual pipeline): grokconv's reader merges the stages (and TP/EP shards) into one
  TP 1 state dict, which is loaded strictly into a one-stage model. The per-rank strict load of such
  layouts is the same spec with fewer layers (tests/test_megatron_core.py loads every rank file).
* Other checkpoints (the original release, safetensors exports) are refused: convert them first.

On a CPU, ``grokconv.mcore.model.cpu_stand_ins`` answers Megatron-Core's unconditional
``torch.cuda.current_device()`` calls with ``cpu`` while the engine runs, and the inference RNG
tracker stands in for the CUDA RNG (no dropout runs). Logits are float32 ``[B, T, vocab_size]``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import traceback
from pathlib import Path

import numpy as np

from . import require
from ..errors import CheckpointFormatError, GrokconvError

__all__ = ["logits", "load_strict", "run_model", "attention_mask"]

ENGINE, MODULE, EXTRA = "megatron-core", "megatron.core", "megatron"


def _check_tokens(tokens, vocab_size: int) -> np.ndarray:
    t = np.asarray(tokens)
    if t.ndim != 2 or t.size == 0 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"tokens must be a non-empty integer [batch, seq] array, got {t.dtype} {t.shape}")
    if t.min() < 0 or t.max() >= vocab_size:
        raise ValueError(f"token ids must lie in 0..{vocab_size - 1}, got {t.min()}..{t.max()}")
    return t.astype(np.int64)


def attention_mask(tokens, pad_token: int):
    """Megatron's boolean mask (True = masked) ``[B, 1, T, T]``: causal, and keys that are padding
    (``token <= pad_token``, as Grok-1 masks them) hidden."""
    import torch
    tok = torch.as_tensor(tokens)
    T = tok.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    keep = (tok > pad_token)[:, None, None, :] & causal[None, None]
    return ~keep


def load_strict(model, state_dict: dict, where) -> None:
    """``model.load_state_dict(state_dict, strict=True)``; a mismatch names the missing and unexpected keys."""
    try:
        model.load_state_dict(dict(state_dict), strict=True)     # a copy: Megatron's load hooks add keys to it
    except RuntimeError:
        # Megatron-Core's linears report an _extra_state (None) and fill it in when absent: not a mismatch
        want = {k for k in model.state_dict() if not k.endswith("._extra_state")}
        have = set(state_dict)
        missing, unexpected = sorted(want - have), sorted(have - want)
        raise CheckpointFormatError(
            f"does not load strictly into grokconv's Grok-1 Megatron-Core spec: {len(missing)} missing "
            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}), {len(unexpected)} unexpected "
            f"({', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''})", path=where,
            hint="write it with grokconv to-megatron (the --transformer-impl the spec is built for)") from None


def run_model(args: argparse.Namespace, state_dict: dict, tokens: np.ndarray, *, dtype: str, pad_token: int,
              impl: str | None = None, where=None) -> np.ndarray:
    """Build the model for ``args`` in the current (initialised) parallel state, load ``state_dict``
    strictly, run it; float32 logits over the padded vocabulary (gathered over TP)."""
    from ..mcore.model import build_model
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    # sequence parallelism as the checkpoint's args say (to-megatron sets it for TP > 1 with MoE), when
    # the sequence splits evenly over the TP ranks; inference is the same without it
    sp = bool(getattr(args, "sequence_parallel", False)) and tp > 1 and tokens.shape[1] % tp == 0
    model = build_model(args, dtype=dtype, impl=impl, sequence_parallel=sp)
    load_strict(model, state_dict, where)
    return forward_logits(model, tokens, pad_token)


def forward_logits(model, tokens: np.ndarray, pad_token: int) -> np.ndarray:
    """Megatron-Core's forward of a loaded one-stage model: float32 logits (gathered over TP)."""
    import torch
    model.eval()
    tok = torch.as_tensor(tokens)
    B, T = tok.shape
    with torch.inference_mode():
        out = model(input_ids=tok, position_ids=torch.arange(T).expand(B, T),
                    attention_mask=attention_mask(tok, pad_token))
    return out.float().numpy()


# ----------------------------------------------------------------------------------------------------
# torch_dist: Megatron-Core's own dist_checkpointing.load, into any layout
# ----------------------------------------------------------------------------------------------------
def load_dist(model, iter_dir, *, poison: bool = True) -> None:
    """``dist_checkpointing.load(model.sharded_state_dict(), iter_dir, strict=raise_all)`` then a strict
    ``load_state_dict``; with ``poison`` every parameter is NaN first, so a value the load does not
    write shows."""
    import torch
    from megatron.core import dist_checkpointing
    if poison:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
    state = dist_checkpointing.load(model.sharded_state_dict(), str(iter_dir), strict="raise_all")
    names = set(model.state_dict())
    load_strict(model, {k: v for k, v in state.items() if k in names}, iter_dir)


def _dist_worker(rank: int, world: int, init_file: str, iter_dir: str, tp: int, ep: int, pp: int, tokens,
                 dtype: str, pad_token: int, out_dir: str, dump: bool) -> None:
    """One rank of a TP x EP x PP layout: builds its part of the model, loads the torch_dist checkpoint
    into it; ``dump``: saves its state dict as ``state_{tp}_{pp}_{ep}.pt``; with ``tokens`` (PP 1) rank 0
    saves the logits."""
    try:
        import torch
        torch.set_num_threads(1)
        from megatron.core import parallel_state as ps
        from ..formats.megatron import load_rank_file
        from ..mcore.model import build_model, cpu_stand_ins, model_parallel
        with cpu_stand_ins(), model_parallel(tp, ep, pp=pp, rank=rank, world_size=world, init_file=init_file):
            args = load_rank_file(Path(iter_dir) / "common.pt")["args"]
            sp = tp > 1 and (tokens is None or tokens.shape[1] % tp == 0)
            model = build_model(args, dtype=dtype, tp=tp, ep=ep, pp=pp, sequence_parallel=sp)
            load_dist(model, iter_dir)
            where = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                     ps.get_expert_model_parallel_rank())
            if dump:
                torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")},
                           Path(out_dir) / "state_{}_{}_{}.pt".format(*where))
            if tokens is not None and pp == 1:
                out = forward_logits(model, tokens, pad_token)
                if rank == 0:
                    np.save(Path(out_dir) / "logits.npy", out)
    except BaseException as e:
        _record_error(out_dir, rank, e)
        raise


def run_dist_layout(iter_dir, out_dir, *, tp: int = 1, ep: int = 1, pp: int = 1, tokens=None, dtype: str = "fp32",
                    pad_token: int = 0, dump: bool = False) -> np.ndarray | None:
    """Load the torch_dist checkpoint in ``iter_dir`` into a TP x EP x PP layout, one gloo process per
    rank; the logits (PP 1, with ``tokens``) or None. ``dump``: each rank's loaded state dict in ``out_dir``."""
    import torch.multiprocessing as mp
    world = tp * ep * pp
    init_file = os.path.join(out_dir, "gloo-init")
    try:
        mp.start_processes(_dist_worker, args=(world, init_file, str(iter_dir), tp, ep, pp, tokens, dtype, pad_token,
                                               str(out_dir), dump),
                           nprocs=world, join=True, start_method=_start_method())
    except Exception as e:
        errs = sorted(Path(out_dir).glob("error-*.txt"))
        msg = errs[0].read_text().strip().splitlines()[-1] if errs else f"a rank process failed ({e})"
        raise GrokconvError(f"Megatron-Core (tp={tp}, ep={ep}, pp={pp}, {world} processes): {msg}",
                            path=iter_dir) from None
    f = Path(out_dir) / "logits.npy"
    return np.load(f) if tokens is not None and pp == 1 else None


# ----------------------------------------------------------------------------------------------------
def _open(path):
    from ..formats.base import open_checkpoint
    reader = open_checkpoint(path)
    if reader.format != "megatron":
        raise CheckpointFormatError(
            f"the megatron-core engine runs Megatron checkpoints, and this is a {reader.format} checkpoint",
            path=path, hint="convert it first: grokconv to-megatron SRC DST")
    return reader


def _merged(reader) -> tuple[argparse.Namespace, dict]:
    """One TP 1 / PP 1 / EP 1 state dict (and its args) from any layout of ``reader``, through
    grokconv's reader (which merges TP shards, finds experts and stages)."""
    from ..formats.megatron import megatron_args, plan_megatron
    from ..formats.megatron.legacy_writer import build_rank
    from ..sharding import Parallel
    pad = getattr(reader.args, "grokconv_vocab_padding", "replicate")
    par = Parallel(1, 1, 1, None, reader.par.untie, reader.par.make_vocab_size_divisible_by)
    plan = plan_megatron(reader.config, par, pad, reader.impl)
    args = megatron_args(reader.config, par, pad, reader.impl)
    state = build_rank(reader, plan, plan.ranks[0], args)
    return args, state["model"]


def _worker(rank: int, world: int, init_file: str, iter_dir: str, tp: int, ep: int, tokens: np.ndarray,
            dtype: str, pad_token: int, impl: str, out_dir: str) -> None:
    """One Megatron rank: its own rank file, strictly loaded; rank 0 saves the (TP-gathered) logits."""
    try:
        import torch
        torch.set_num_threads(1)
        from megatron.core import parallel_state
        from ..formats.megatron import RANK_FILE, load_rank_file
        from ..mcore.model import cpu_stand_ins, model_parallel
        from ..sharding import checkpoint_dir_name
        with cpu_stand_ins(), model_parallel(tp, ep, rank=rank, world_size=world, init_file=init_file):
            t = parallel_state.get_tensor_model_parallel_rank()
            e = parallel_state.get_expert_model_parallel_rank()
            f = Path(iter_dir) / checkpoint_dir_name(t, 0, e, 1, ep) / RANK_FILE
            sd = load_rank_file(f)
            out = run_model(sd["args"], sd["model"], tokens, dtype=dtype, pad_token=pad_token, impl=impl, where=f)
            if rank == 0:
                np.save(Path(out_dir) / "logits.npy", out)
    except BaseException as e:
        _record_error(out_dir, rank, e)
        raise


def _record_error(out_dir, rank: int, e: BaseException) -> None:
    """A rank's failure, for the parent to report: a grokconv error as its one line, else the traceback."""
    (Path(out_dir) / f"error-{rank}.txt").write_text(f"{e}" if isinstance(e, GrokconvError) else traceback.format_exc())


def _start_method() -> str:
    """``forkserver`` with torch, Megatron-Core and this module preloaded in the server: the server
    imports them once (per process, reused by later calls), and every rank forks from it in a moment,
    where a spawned rank spends 10-40 s importing them on a busy 2-core machine. (A plain ``fork`` of a
    process that has run torch's thread pools can crash the child: it did here, SIGSEGV.)
    ``GROKCONV_MP_START`` overrides."""
    import multiprocessing
    forced = os.environ.get("GROKCONV_MP_START")
    if forced:
        return forced
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.set_forkserver_preload(["torch", "megatron.core", "grokconv.engines.megatron_core"])
    return "forkserver"


def _spawn(reader, tokens: np.ndarray, dtype: str) -> np.ndarray:
    import torch.multiprocessing as mp
    tp, ep = reader.par.tp, reader.par.ep
    world = tp * ep
    with tempfile.TemporaryDirectory(prefix="grokconv-mcore-") as tmp:
        init_file = os.path.join(tmp, "gloo-init")
        try:
            mp.start_processes(_worker, args=(world, init_file, str(reader.iter_dir), tp, ep, tokens, dtype,
                                              reader.config.pad_token, reader.impl, tmp),
                               nprocs=world, join=True, start_method=_start_method())
        except Exception as e:
            errs = sorted(Path(tmp).glob("error-*.txt"))
            msg = errs[0].read_text().strip().splitlines()[-1] if errs else f"a rank process failed ({e})"
            raise GrokconvError(f"Megatron-Core (tp={tp}, ep={ep}, {world} processes): {msg}",
                                path=reader.iter_dir) from None
        return np.load(Path(tmp) / "logits.npy")


def _require_te(where) -> None:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        from ..errors import EngineUnavailableError
        raise EngineUnavailableError(
            "this checkpoint is named for the Transformer Engine spec (input norm in "
            "self_attention.linear_qkv.layer_norm_weight), and transformer_engine is not installed", path=where,
            hint="install Transformer Engine (needs a GPU), or write the checkpoint with "
                 "grokconv to-megatron --transformer-impl local") from None


def logits(path, tokens, *, dtype: str = "bf16", tp: int = 1, ep: int = 1) -> np.ndarray:
    """Megatron-Core's float32 logits ``[B, T, vocab_size]`` for ``tokens`` on the Megatron checkpoint ``path``.

    A legacy checkpoint runs in the layout it was written for; a torch_dist checkpoint is loaded by
    Megatron-Core's ``dist_checkpointing`` into TP ``tp`` x EP ``ep`` (one gloo process per rank)."""
    require(MODULE, EXTRA, ENGINE)
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be bf16 or fp32, got {dtype!r}")
    reader = _open(path)
    try:
        if reader.impl == "transformer_engine":
            _require_te(reader.iter_dir)
        cfg = reader.config
        tokens = _check_tokens(tokens, cfg.vocab_size)
        par = reader.par
        if getattr(reader, "kind", None) == "torch_dist":
            with tempfile.TemporaryDirectory(prefix="grokconv-mcore-") as tmp:
                out = run_dist_layout(reader.iter_dir, tmp, tp=tp, ep=ep, tokens=tokens, dtype=dtype,
                                      pad_token=cfg.pad_token)
        elif (tp, ep) != (1, 1) and (tp, ep) != (par.tp, par.ep):
            raise CheckpointFormatError(f"a legacy checkpoint runs in the layout it was written for (tp={par.tp}, "
                                        f"ep={par.ep}), not tp={tp} ep={ep}", path=reader.iter_dir,
                                        hint="write --format torch_dist to load it into any layout")
        elif par.pp == 1 and par.vp is None and par.tp * par.ep > 1:
            out = _spawn(reader, tokens, dtype)
        else:
            from ..mcore.model import cpu_stand_ins, model_parallel
            if par.pp == 1 and par.vp is None:
                from ..formats.megatron import RANK_FILE, load_rank_file
                f = reader.iter_dir / "mp_rank_00" / RANK_FILE
                sd = load_rank_file(f)
                args, state, where = sd["args"], sd["model"], f
            else:
                args, state = _merged(reader)
                where = reader.iter_dir
            with cpu_stand_ins(), model_parallel(1, 1):
                out = run_model(args, state, tokens, dtype=dtype, pad_token=cfg.pad_token, impl=reader.impl,
                                where=where)
    finally:
        reader.close()
    return np.ascontiguousarray(out[..., :cfg.vocab_size], dtype=np.float32)


def _main(argv=None) -> int:
    """``python -m grokconv.engines.megatron_core DIR``: Megatron-Core's logits on a Megatron checkpoint
    against grokconv's reference forward on the same checkpoint (seeded tokens, the last row left-padded)."""
    import argparse as ap
    import torch
    from ..forward import forward
    from ..parity import compare_logits, random_tokens
    p = ap.ArgumentParser(prog="python -m grokconv.engines.megatron_core")
    p.add_argument("path")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--pad", type=int, default=3, help="pad tokens at the start of the last row")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    reader = _open(a.path)
    tok = random_tokens(reader.config.vocab_size, a.batch, a.seq_len, a.seed, reader.config.pad_token).numpy()
    tok[-1, :a.pad] = reader.config.pad_token
    ref = forward(reader, tok, dtype=a.dtype).logits
    # through the imported module, not __main__, so that the rank processes find _worker by its real name
    engine = __import__("grokconv.engines.megatron_core", fromlist=["logits"])
    got = torch.from_numpy(engine.logits(a.path, tok, dtype=a.dtype))
    s = compare_logits(ref, got)
    rel = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
    print(f"megatron-core {__import__('megatron.core', fromlist=['__version__']).__version__} tp={reader.par.tp} "
          f"pp={reader.par.pp} ep={reader.par.ep} {a.dtype}, {a.batch}x{a.seq_len} tokens: logits rel L2 {rel:.3g}, "
          f"max abs {s.max_abs:.3g} (reference max {ref.abs().max().item():.3g}), KL {s.kl:.3g}, top-1 {s.top1:.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
