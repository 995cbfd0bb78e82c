import click

from ..config import PRESETS, GrokConfig, load_preset
from ..synth import TRAINED_PRESETS, synthesize, write_trained
from ._output import emit, json_option, overwrite_option


@click.command("synth")
@click.argument("out", type=click.Path())
@click.option("--preset", type=click.Choice([*PRESETS, *TRAINED_PRESETS]), default="tiny", show_default=True)
@click.option("--config", "config_path", type=click.Path(exists=True), help="A grokconv-config.json instead of a preset.")
@click.option("--layers", "num_layers", type=int, help="Number of layers (overrides the preset).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-progress", is_flag=True)
@overwrite_option
@json_option
def command(out, preset, config_path, num_layers, seed, no_progress, overwrite, as_json):
    """Write a synthetic checkpoint in the exact format of the Grok-1 release.

    `tiny` is small enough for CI and within the original loader's limits; `full-width` has the real
    tensor shapes (2 layers unless --layers). Same seed, same bytes. `tiny-trained` is a small model
    trained on English (Python's pydoc topics) with its tokenizer.model, copied from the package and
    sha256-verified (--config and --layers are refused; --seed does not apply).
    """
    if preset in TRAINED_PRESETS:
        if config_path or num_layers:
            raise click.UsageError(f"--preset {preset} is a trained checkpoint: it takes no --config or --layers")
        cfg = GrokConfig.load(write_trained(out, preset, overwrite=overwrite) / "grokconv-config.json")
        emit({"command": "synth", "out": out, "preset": preset, "seed": None, "trained": True,
              "tokenizer": "tokenizer.model", "config": cfg.to_dict()}, as_json,
             lambda: click.echo(f"wrote {out}: {preset}, {cfg.num_layers} layers, d_model {cfg.emb_size}, vocab "
                                f"{cfg.vocab_size}, with tokenizer.model (sha256 verified)"))
        return

    import time

    from tqdm import tqdm

    from ..schema import param_specs
    cfg = GrokConfig.load(config_path) if config_path else load_preset(preset)
    if num_layers:
        cfg = GrokConfig.from_dict({**cfg.to_dict(), "num_layers": num_layers})
    t0 = time.perf_counter()
    with tqdm(total=len(param_specs(cfg)), unit="file", desc="synth", disable=no_progress) as bar:
        synthesize(out, cfg, seed=seed, progress=lambda spec: bar.update(1), overwrite=overwrite)
    emit({"command": "synth", "out": out, "preset": None if config_path else preset, "seed": seed,
          "files": len(param_specs(cfg)), "seconds": round(time.perf_counter() - t0, 3), "config": cfg.to_dict()},
         as_json, lambda: click.echo(f"wrote {out}: {cfg.num_layers} layers, d_model {cfg.emb_size}, seed {seed}"))
