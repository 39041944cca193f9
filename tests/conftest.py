"""Every test runs on 8 simulated CPU devices, set before JAX initialises its backend."""
import os

# Tiny models: compiling, not running, is what a test waits for, so LLVM gets its cheap settings (half the
# compile time), and XLA:CPU its elemental emitters instead of the fusion emitters (a tiny UNet train step: compile
# 12.7 s -> 7.8 s, CPU time 19 s -> 9 s, the step as fast; the whole suite 4740 s -> 4122 s, though a few bigger
# programs run slower). The programs compute the same functions; the parity tolerances hold. Processes a test starts
# itself (the pod rehearsal) take the same settings.
CHEAP_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                           "--xla_cpu_use_fusion_emitters=false")
TEST_XLA_FLAGS = "--xla_force_host_platform_device_count=8 " + CHEAP_COMPILE_XLA_FLAGS
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hermetic: nothing is downloaded
# Identical programs (a restarted run, the same tiny config in several tests) compile once per session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"perflow_jax_test_jit_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
