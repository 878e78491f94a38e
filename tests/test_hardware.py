"""Every hardware decision is taken in ragrpo.hardware, can be forced, and holds on every CPU kind."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs_openmp_release, openmp_team

from ragrpo import RagrpoError, hardware

# the ISA caps that make an AVX512-BF16 or AMX CPU compute as an AVX2-only one does
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@pytest.mark.parametrize("value, expected", [("0", False), ("1", True)])
def test_bf16_can_be_forced_both_ways(force_hardware, value, expected):
    force_hardware(BF16=value)
    assert hardware.bf16() is expected
    from ragrpo.config import build_run_config, engine_settings, grpo_config

    assert engine_settings().get("bf16", False) is expected
    assert grpo_config(build_run_config(), "/tmp/unused").bf16 is expected  # the fast engine's training dtype


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_a_forced_value_other_than_0_or_1_is_one_clear_error(force_hardware, value):
    force_hardware(BF16=value, PACK=None)
    with pytest.raises(RagrpoError, match=f"RAGRPO_BF16={value!r}: use 0 or 1"):
        hardware.bf16()
    force_hardware(BF16=None, PACK=value)
    with pytest.raises(RagrpoError, match=f"RAGRPO_PACK={value!r}: use 0 or 1"):
        hardware.pack(torch.float32)
    force_hardware(PACK=None, FP16=value)
    with pytest.raises(RagrpoError, match=f"RAGRPO_FP16={value!r}: use 0 or 1"):
        hardware.fp16()


def test_packing_can_be_forced_off_and_on_where_onednn_can_pack(force_hardware):
    from conftest import needs_packing

    force_hardware(PACK="0")
    assert hardware.pack(torch.float32) is False and hardware.pack(torch.bfloat16) is False
    needs_packing(torch.float32)
    force_hardware(PACK="1")
    assert hardware.pack(torch.float32) is True
    force_hardware(PACK=None)
    assert hardware.pack(torch.float32) is True  # the default wherever oneDNN can


def test_forcing_bf16_packing_where_onednn_has_no_bf16_is_refused(force_hardware):
    force_hardware(PACK="1")
    if hardware.can_pack(torch.bfloat16):
        assert hardware.pack(torch.bfloat16) is True
        pytest.skip("this CPU's oneDNN packs bf16: the refusal is checked on CPUs (or ISA caps) without it")
    with pytest.raises(RagrpoError, match="RAGRPO_PACK=1, but oneDNN cannot pack bfloat16"):
        hardware.pack(torch.bfloat16)


@pytest.mark.parametrize("float32_ms, bfloat16_ms, fast", [
    (2.51, 1.09, True),    # measured on an AVX512-BF16 CPU without AMX
    (2.87, 15.71, False),  # the same CPU capped to AVX2: bf16 emulated
    (1.0, 0.8, True),      # at the line
    (1.0, 0.81, False),
    (1.0, 1.0, False),     # no gain is no reason to round weights
])
def test_the_bf16_rule(float32_ms, bfloat16_ms, fast):
    assert hardware.decide_bf16(float32_ms, bfloat16_ms)["fast"] is fast


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or "avx2" not in hardware.cpu_flags(),
                    reason="the AVX2 cap needs an x86 CPU with AVX2")
def test_with_the_isa_capped_to_avx2_bf16_is_measured_slow_and_not_packed(tmp_path):
    """What an AVX2-only CPU decides, on any x86 CPU: the measurement, not the CPU's flags, decides. bf16 is
    emulated there, so the copies stay float32, and the decode loop holds their weights in fp16."""
    code = ("import torch; from ragrpo import hardware; "
            "print(hardware.bf16(), hardware.pack(torch.bfloat16), hardware.pack(torch.float32), "
            "hardware.decode_weights(torch.float32))")
    env = {**os.environ, **AVX2_ONLY, "RAGRPO_CACHE": str(tmp_path)}
    for name in ("RAGRPO_BF16", "RAGRPO_PACK", "RAGRPO_FP16"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "True", "fp16"]
    cached = json.loads((tmp_path / "hardware.json").read_text())
    (record,) = cached.values()
    assert record["bf16"]["bfloat16_ms"] > record["bf16"]["float32_ms"], "emulated bf16 is slower than float32"
    assert record["fp16_decode"]["fp16_ms"] < record["fp16_decode"]["float32_ms"], "half the bytes to read"


@pytest.mark.parametrize("value, float32_weights", [("0", "onednn"), ("1", "fp16")])
def test_fp16_decode_weights_can_be_forced_both_ways(force_hardware, value, float32_weights):
    from conftest import needs_fp16, needs_packing

    needs_packing(torch.float32)
    needs_fp16()
    force_hardware(FP16=value, PACK=None)
    assert hardware.fp16() is (value == "1")
    assert hardware.decode_weights(torch.float32) == float32_weights
    assert hardware.decode_weights(torch.bfloat16) != "fp16"  # fbgemm's fp16 GEMM takes float32 activations
    force_hardware(FP16=value, PACK="0")
    assert hardware.decode_weights(torch.float32) == ("fp16" if value == "1" else "plain")


def test_forcing_fp16_where_torch_has_no_fbgemm_is_refused(force_hardware, monkeypatch):
    """On an ARM CPU torch's quantized engines are qnnpack's only; there RAGRPO_FP16=1 is one clear error and
    the default is float32."""
    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", ["qnnpack", "none"])
    force_hardware(FP16="1")
    with pytest.raises(RagrpoError, match="RAGRPO_FP16=1, but torch has no fbgemm fp16 GEMM here"):
        hardware.fp16()
    force_hardware(FP16=None)
    assert hardware.fp16() is False and hardware.decode_weights(torch.float32) != "fp16"


@pytest.mark.parametrize("float32_ms, fp16_ms, fast", [
    (0.41, 0.18, True),   # gate/up, 6 rows, ISA capped to AVX2
    (0.33, 0.17, True),   # the same on an AVX512-BF16 CPU
    (1.0, 0.8, True),     # at the line
    (1.0, 0.81, False),
    (1.0, 1.0, False),    # no gain is no reason to round weights
])
def test_the_fp16_rule(float32_ms, fp16_ms, fast):
    assert hardware.decide_fp16(float32_ms, fp16_ms)["fast"] is fast


def test_the_measurement_is_cached_per_machine_and_isa(force_hardware, monkeypatch, tmp_path):
    monkeypatch.setenv("RAGRPO_CACHE", str(tmp_path))
    force_hardware(BF16=None)
    calls = []
    monkeypatch.setattr(hardware, "measure_bf16", lambda: calls.append(1) or hardware.decide_bf16(2.0, 1.0))
    assert hardware.bf16() is True and len(calls) == 1
    hardware.reset()
    assert hardware.bf16() is True and len(calls) == 1, "read back from the cache, not measured again"
    assert Path(tmp_path / "hardware.json").exists()
    other = "SSE41" if os.environ.get("DNNL_MAX_CPU_ISA") != "SSE41" else "AVX2"
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", other)  # another ISA cap: another entry
    monkeypatch.setattr(hardware, "measure_bf16", lambda: calls.append(1) or hardware.decide_bf16(2.0, 8.0))
    hardware.reset()
    assert hardware.bf16() is False and len(calls) == 2
    assert len(json.loads((tmp_path / "hardware.json").read_text())) == 2


def test_both_measurements_share_the_machines_cache_entry(force_hardware, monkeypatch, tmp_path):
    from conftest import needs_fp16

    needs_fp16()
    monkeypatch.setenv("RAGRPO_CACHE", str(tmp_path))
    force_hardware(BF16=None, FP16=None)
    calls = []
    monkeypatch.setattr(hardware, "measure_bf16", lambda: calls.append("bf16") or hardware.decide_bf16(2.0, 8.0))
    monkeypatch.setattr(hardware, "measure_fp16", lambda: calls.append("fp16") or hardware.decide_fp16(0.4, 0.2))
    assert hardware.bf16() is False and hardware.fp16() is True
    hardware.reset()
    assert hardware.fp16() is True and hardware.bf16() is False and calls == ["bf16", "fp16"]
    (entry,) = json.loads((tmp_path / "hardware.json").read_text()).values()
    assert entry["bf16"]["fast"] is False and entry["fp16_decode"] == {"float32_ms": 0.4, "fp16_ms": 0.2, "fast": True}


def test_threads_are_set_once_from_the_variable_or_the_argument(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("RAGRPO_THREADS", "1")
        assert hardware.set_threads() == 1 == torch.get_num_threads()
        assert hardware.set_threads(2) == 2 == torch.get_num_threads()
        monkeypatch.setenv("RAGRPO_THREADS", "many")
        with pytest.raises(RagrpoError, match="thread count 'many'"):
            hardware.set_threads()
    finally:
        torch.set_num_threads(before)


def test_every_command_takes_its_thread_count_from_the_variable():
    def run(threads):
        return subprocess.run([sys.executable, "-m", "ragrpo.cli", "hardware"], capture_output=True, text=True,
                              env={**os.environ, "RAGRPO_THREADS": threads, "RAGRPO_BF16": "0", "RAGRPO_FP16": "0"},
                              timeout=300)

    one = run("1")
    assert one.returncode == 0, one.stderr
    record = json.loads(one.stdout)
    assert record["threads"] == 1 and record["forced"]["RAGRPO_THREADS"] == "1"
    assert record["bf16"] is False and record["fp16_decode"] is False  # the other variables hold too
    bad = run("many")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "Error: thread count 'many': use a whole number of at least 1"]


def test_the_device_can_be_forced(force_hardware):
    force_hardware(DEVICE="cpu")
    assert hardware.device() == "cpu"
    force_hardware(DEVICE="tpu")
    with pytest.raises(RagrpoError, match="RAGRPO_DEVICE='tpu'"):
        hardware.device()
    force_hardware(DEVICE="cuda")
    if torch.cuda.is_available():
        assert hardware.device() == "cuda"
    else:
        with pytest.raises(RagrpoError, match="sees no CUDA device"):
            hardware.device()


def test_training_attention_follows_the_dtype_and_can_be_forced_both_ways(force_hardware):
    force_hardware(ATTENTION=None, DEVICE="cpu")
    assert hardware.attention(torch.bfloat16) == "eager" and hardware.attention(torch.float32) == "sdpa"
    for value in ("eager", "sdpa"):
        force_hardware(ATTENTION=value)
        assert hardware.attention(torch.bfloat16) == value and hardware.attention(torch.float32) == value
        assert hardware.summary()["forced"]["RAGRPO_ATTENTION"] == value
    force_hardware(ATTENTION="flash")
    with pytest.raises(RagrpoError, match="RAGRPO_ATTENTION='flash': use eager or sdpa"):
        hardware.attention(torch.float32)


def test_no_other_module_probes_the_hardware():
    source = Path(hardware.__file__).parent
    probes = ("/proc/cpuinfo", "_is_mkldnn_bf16_supported", "cuda.is_bf16_supported", "get_cpu_capability",
              "supported_engines")
    for path in source.rglob("*.py"):
        if path.name != "hardware.py":
            text = path.read_text()
            assert not [p for p in probes if p in text], f"{path.relative_to(source)} probes the hardware"


def test_the_summary_names_the_flags_and_each_decision(force_hardware):
    force_hardware(BF16="0", PACK="0", FP16="0")
    record = hardware.summary()
    assert record["bf16"] is False and record["pack_float32"] is False and record["fp16_decode"] is False
    assert record["decode_weights"] == {"float32": "plain", "bfloat16": "plain"}
    assert record["forced"]["RAGRPO_BF16"] == "0" and set(record["cpu_flags"]) <= {
        "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def test_small_jobs_run_on_one_thread_and_leave_every_other_count_alone():
    """Server threads embed queries at once; neither they nor a thread started afterwards may lose
    threads (torch hands a new thread the last count set anywhere)."""
    import threading
    import time

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        start, inside, callers = threading.Barrier(8), [], []

        def embed_a_query():
            start.wait()
            inside.append(hardware.small_job(lambda: (time.sleep(0.01), torch.get_num_threads())[1]))
            callers.append(torch.get_num_threads())

        workers = [threading.Thread(target=embed_a_query) for _ in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        later = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert inside == [1] * 8 and later == [2] and torch.get_num_threads() == 2
        assert set(callers) == {torch.get_num_threads()}  # what each request thread started with
    finally:
        torch.set_num_threads(before)


FRAGMENTED_HEAP = """
import json, os
from ragrpo import hardware

def rss_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

blocks = [bytes(1000) + bytes([i % 256]) for i in range(300_000)]  # about 300 MB in malloc'd blocks
kept = blocks[::64]  # one block in 64 survives: the heap cannot shrink from its top
del blocks
before = rss_mb()
released = hardware.release_memory()
print(json.dumps({"released": released, "dropped_mb": before - rss_mb()}))
"""


@pytest.mark.parametrize("value", ["1", "0", None])
def test_freed_heap_pages_go_back_to_the_os_only_where_trimming_is_on(value):
    """A heap with one live block in 64 keeps its freed pages until malloc_trim hands them back."""
    if hardware._malloc_trim() is None:
        if value == "1":
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("RAGRPO_TRIM", "1")
                with pytest.raises(RagrpoError, match="RAGRPO_TRIM=1: this C library has no malloc_trim"):
                    hardware.trim()
        pytest.skip("this C library is not glibc: there is no malloc_trim to call")
    env = {k: v for k, v in os.environ.items() if k != "RAGRPO_TRIM"} | ({"RAGRPO_TRIM": value} if value else {})
    out = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    result = json.loads(out.stdout)
    if value == "0":
        assert result["released"] is False and result["dropped_mb"] < 50, result
    else:  # forced on, or the default on glibc
        assert result["released"] is True and result["dropped_mb"] > 150, result


@pytest.mark.parametrize("given, expected", [(None, hardware.ONEDNN_CACHE), ("7", "7")])
def test_importing_ragrpo_gives_onednn_a_small_primitive_cache_unless_the_user_chose_one(given, expected):
    """oneDNN reads its cache size once, at its first primitive: the variable must be set by then, in the
    process's environment, and a user's own value wins."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    env |= {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": given} if given else {}
    probe = ("import os, ragrpo, torch; from ragrpo import hardware; "
             "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], hardware.summary()['onednn_cache'])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120,
                         check=True)
    assert out.stdout.split() == [expected, expected]


def test_releasing_openmp_ends_the_calling_threads_workers_and_a_later_op_starts_them_again(force_hardware):
    needs_openmp_release()
    force_hardware(OMP_RELEASE=None)

    found = openmp_team(hardware.release_openmp)
    assert found["team"], "a parallel op on 2 threads started no worker"
    assert found["returned"] is True and not found["alive"]

    def release_then_compute():
        hardware.release_openmp()
        return (torch.ones(512, 512) @ torch.ones(512, 512)).sum().item()

    found = openmp_team(release_then_compute)
    assert found["returned"] == 512 ** 3  # the next parallel op runs, on a new team


def test_releasing_openmp_can_be_forced_off_and_refused_without_a_runtime(force_hardware, monkeypatch):
    needs_openmp_release()
    force_hardware(OMP_RELEASE="0")
    found = openmp_team(hardware.release_openmp)
    assert found["returned"] is False and found["alive"] == found["team"] != set()
    assert hardware.summary()["omp_release"] is False
    force_hardware(OMP_RELEASE="1")
    monkeypatch.setattr(hardware, "_openmp_runtimes", list)
    with pytest.raises(RagrpoError, match="RAGRPO_OMP_RELEASE=1: no OpenMP runtime"):
        hardware.release_openmp()
    force_hardware(OMP_RELEASE="2")
    with pytest.raises(RagrpoError, match="RAGRPO_OMP_RELEASE='2': use 0 or 1"):
        hardware.release_openmp()


def test_where_the_runtime_ends_every_team_a_release_beside_other_work_is_not_asked(force_hardware, monkeypatch):
    """LLVM's and Intel's runtimes end every thread's team on a pause: an idle engine thread must not pause one
    while another thread computes. libgomp's ends the caller's only."""
    force_hardware(OMP_RELEASE=None)
    calls = []
    for own_team_only, expected in ((False, [False, True]), (True, [True, True])):
        calls.clear()
        runtimes = [(lambda kind: calls.append(kind) or 0, own_team_only)]
        monkeypatch.setattr(hardware, "_openmp_runtimes", lambda runtimes=runtimes: runtimes)
        assert [hardware.release_openmp(others_may_compute=True), hardware.release_openmp()] == expected
        assert calls == [2] * sum(expected)  # omp_pause_hard, only where it was asked
