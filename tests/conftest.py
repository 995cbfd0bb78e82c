import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "reference"
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny synthetic checkpoint in the release's format (12 layers: lexicographic order matters)."""
    from grokconv.config import load_preset
    from grokconv.synth import synthesize
    out = tmp_path_factory.mktemp("tiny") / "grok"
    synthesize(out, load_preset("tiny"), seed=0)
    return out


@pytest.fixture(scope="session")
def reference_dir():
    if not SHARED.is_dir():
        pytest.fail(f"shared reference facts not found at {SHARED} (CI clones with ../shared beside the repo)")
    return SHARED


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory):
    """The trained preset (``tiny-trained``: 12 layers, d_model 64, vocab 1024, learned on Python's pydoc
    topics) with its tokenizer.model, unpacked from the package (sha256-verified)."""
    from grokconv.synth import write_trained
    return write_trained(tmp_path_factory.mktemp("trained") / "grok")


@pytest.fixture(scope="session")
def trained_tokens(trained_ckpt):
    """Two batches of 2 x 32 held-out tokens (text the trained model never saw)."""
    pytest.importorskip("sentencepiece")
    sys.path.insert(0, str(ROOT / "tools"))
    import train_tiny
    return train_tiny.heldout_batches(trained_ckpt / "tokenizer.model", 2)
