"""CPU capability detection and the `mixed_precision auto` choice, fed with real flag sets."""
import pytest
import torch

from beit.runtime.precision import cpu_capability, cpu_flags, resolve_mixed_precision

# /proc/cpuinfo flag subsets of real machines (the relevant flags among many others)
AVX2_EPYC = "fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi1 bmi2".split()
SKYLAKE_X = AVX2_EPYC + "avx512f avx512dq avx512cd avx512bw avx512vl".split()
COOPER_LAKE = SKYLAKE_X + ["avx512_bf16"]
SAPPHIRE_RAPIDS = SKYLAKE_X + "avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8".split()
ZEN4 = SKYLAKE_X + ["avx512_bf16"]


@pytest.mark.parametrize("flags, torch_cap, fast", [
    (AVX2_EPYC, "AVX2", False),
    (SKYLAKE_X, "AVX512", False),          # AVX-512 without bf16 instructions: bf16 is emulated
    (COOPER_LAKE, "AVX512", True),
    (ZEN4, "AVX512", True),
    (SAPPHIRE_RAPIDS, "AVX512", True),
    (SAPPHIRE_RAPIDS, "AVX2", False),      # torch limited to AVX2 kernels (ATEN_CPU_CAPABILITY=avx2)
    ([], "DEFAULT", False),                # flags unreadable (not Linux): never guess
])
def test_fast_bf16_is_detected_from_flags(flags, torch_cap, fast):
    cap = cpu_capability(flags, torch_cap)
    assert cap["fast_bf16"] is fast
    assert cap["torch"] == torch_cap


def test_capability_fields():
    cap = cpu_capability(SAPPHIRE_RAPIDS, "AVX512")
    assert cap["amx"] and cap["avx512"] and cap["avx512_bf16"] and cap["avx2"]
    cap = cpu_capability(AVX2_EPYC, "AVX2")
    assert cap["avx2"] and not cap["avx512"] and not cap["amx"]


def test_this_machine_is_read():
    cap = cpu_capability()
    assert cap["torch"] == torch.backends.cpu.get_cpu_capability()
    assert cap["avx2"] == ("avx2" in cpu_flags() or cap["torch"] in ("AVX2", "AVX512"))


def test_auto_on_cpu_follows_the_detection(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_mixed_precision("auto", cpu_fast_bf16=True) == "bf16"
    assert resolve_mixed_precision("auto", cpu_fast_bf16=False) == "no"
    assert resolve_mixed_precision("no", cpu_fast_bf16=True) == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # a GPU, but forced onto the CPU
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert resolve_mixed_precision("auto", cpu_fast_bf16=False) == "no"


def test_finetune_accepts_auto():
    from beit.options.finetune import FinetuneConfig
    assert FinetuneConfig.__dataclass_fields__["mixed_precision"].default == "auto"
