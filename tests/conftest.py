import importlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "reference"
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# What the `test` extra installs (pyproject.toml): under CI (CI=true) one of these missing is a broken
# install, not a reason to skip. Libraries a make target installs for its own tests (llama_cpp:
# `make test-llama-cpp`) are required where that target names them in GROKCONV_REQUIRE (comma-separated).
TEST_EXTRA = ("transformers", "compressed_tensors", "sentencepiece", "gguf", "megatron.core")


def require(module: str, reason: str | None = None):
    """Import an engine library for a test, or skip it with a reason (``-rs`` prints it). A failure, not a
    skip: any import error other than ImportError (a broken install) and, under ``CI=true``, a library
    of the ``test`` extra or of ``GROKCONV_REQUIRE`` that does not import at all."""
    required = os.environ.get("CI", "").lower() in ("true", "1") and (
        module in TEST_EXTRA or module in os.environ.get("GROKCONV_REQUIRE", "").split(","))
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if required:
            pytest.fail(f"CI=true requires {module!r}, which does not import ({type(e).__name__}: {e})", pytrace=False)
        pytest.skip(reason or f"{module} is not installed ({e})", allow_module_level=True)
    except Exception as e:   # noqa: BLE001 - a library that is there but broken
        pytest.fail(f"{module!r} is installed but broken: importing it raised {type(e).__name__}: {e}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny synthetic checkpoint in the release's format (12 layers: lexicographic order matters)."""
    from grokconv.config import load_preset
    from grokconv.synth import synthesize
    out = tmp_path_factory.mktemp("tiny") / "grok"
    synthesize(out, load_preset("tiny"), seed=0)
    return out


@pytest.fixture(scope="session")
def unfilled_heads_ckpt(tmp_path_factory):
    """A synthetic model whose heads do not fill d_model (16 heads of 32 in d_model 256, 2 layers): what
    llama.cpp and vLLM, which take the head size as d_model / heads, would misread."""
    from grokconv.config import load_preset
    from grokconv.synth import synthesize
    cfg = load_preset("tiny", key_size=32, num_layers=2)
    assert cfg.num_q_heads * cfg.key_size != cfg.emb_size
    out = tmp_path_factory.mktemp("unfilled") / "grok"
    synthesize(out, cfg, seed=0)
    return out


@pytest.fixture(scope="session")
def reference_dir():
    if not SHARED.is_dir():
        pytest.fail(f"shared reference facts not found at {SHARED} (CI clones with ../shared beside the repo)")
    return SHARED


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory):
    """The trained preset (``tiny-trained``: 4 layers, d_model 256 = 8 heads x 32, vocab 1024, learned on
    Python's pydoc topics) with its tokenizer.model, unpacked from the package (sha256-verified)."""
    from grokconv.synth import write_trained
    return write_trained(tmp_path_factory.mktemp("trained") / "grok")


@pytest.fixture(scope="session")
def trained_tokens(trained_ckpt):
    """Two batches of 2 x 32 held-out tokens (text the trained model never saw)."""
    require("sentencepiece")
    sys.path.insert(0, str(ROOT / "tools"))
    import train_tiny
    return train_tiny.heldout_batches(trained_ckpt / "tokenizer.model", 2)
