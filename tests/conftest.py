import importlib.util
import os
import shutil
import tempfile

# Several fake CPU devices for the tensor-parallel and pmap tests; must be set before jax loads.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()

# XLA's CPU backend at LLVM optimization level 0 in the test processes and the scripts they run
# as subprocesses: most of the suite's time is compiling interpreted Pallas kernels and tiny
# engines once each, whose runs are short, so compiling without LLVM's optimizations took the CI
# suite from 16:55 to 13:13 on 2 cores (the test processes), and the script tests' files from
# 183 to 169 s (their subprocesses too, which had compiled at the default level). Only where no
# CUDA plugin is installed (the GPU tests compile as users do). JAXLORA_TEST_FAST_COMPILE=0
# turns it off.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
_fast_compile = os.environ.get("JAXLORA_TEST_FAST_COMPILE", "1") == "1" and not any(
    importlib.util.find_spec(name) is not None
    for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")
)
if _fast_compile and _FAST_COMPILE not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {_FAST_COMPILE}"

import jax  # noqa: E402
import pytest  # noqa: E402


def xla_flags_of_users() -> str:
    """XLA_FLAGS without the fast-compile flag: for a subprocess that must compile as a user's."""
    return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f != _FAST_COMPILE)


jax.config.update("jax_default_matmul_precision", "highest")

# One compilation cache per test run, shared by its xdist workers (they inherit the directory
# from the controller's environment) and removed when the run ends: many tests build the same
# tiny engines, whose step programs then compile once (tests/test_engine.py and
# tests/test_benchmark.py: 6:00 -> 3:44 on 2 CPU cores). JAXLORA_TEST_COMPILATION_CACHE=0
# turns it off.
_CACHE_ENV = "JAXLORA_TEST_JIT_CACHE"
_own_cache = None
if os.environ.get("JAXLORA_TEST_COMPILATION_CACHE", "1") == "1":
    _cache_dir = os.environ.get(_CACHE_ENV)
    if not _cache_dir:
        _cache_dir = _own_cache = tempfile.mkdtemp(prefix="jaxlora-jit-")
        os.environ[_CACHE_ENV] = _cache_dir
    jax.config.update("jax_compilation_cache_dir", _cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if _own_cache is not None:
        shutil.rmtree(_own_cache, ignore_errors=True)


def has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (compiled Pallas Triton kernels)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny model's tokenizer (modules may define their own)."""
    from jaxlora.tokenizer import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def base():
    """The tiny model's parameters, seed 0 (modules may define their own)."""
    from configs.models import TINY
    from jaxlora.model import init_params

    return init_params(TINY, 0)
