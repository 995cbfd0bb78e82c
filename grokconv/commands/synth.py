import click

from ..config import PRESETS, GrokConfig, load_preset
from ..synth import synthesize


@click.command("synth")
@click.argument("out", type=click.Path())
@click.option("--preset", type=click.Choice(PRESETS), default="tiny", show_default=True)
@click.option("--config", "config_path", type=click.Path(exists=True), help="A grokconv-config.json instead of a preset.")
@click.option("--layers", "num_layers", type=int, help="Number of layers (overrides the preset).")
@click.option("--seed", type=int, default=0, show_default=True)
def command(out, preset, config_path, num_layers, seed):
    """Write a synthetic checkpoint in the exact format of the Grok-1 release.

    `tiny` is small enough for CI and within the original loader's limits; `full-width` has the real
    tensor shapes (2 layers unless --layers). Same seed, same bytes.
    """
    cfg = GrokConfig.load(config_path) if config_path else load_preset(preset)
    if num_layers:
        cfg = cfg.replace(num_layers=num_layers).validate()
    synthesize(out, cfg, seed=seed)
    click.echo(f"wrote {out}: {cfg.num_layers} layers, d_model {cfg.emb_size}, seed {seed}")
