"""Every hardware decision ragrpo makes, in one place, each one forced by an environment variable.

    RAGRPO_DEVICE   cpu | cuda   where models run; default: cuda where torch sees a GPU
    RAGRPO_BF16     0 | 1        bf16 for the frozen base and autocast in training, for evaluation's sampling
                                 copy and for the embedder; default: measured, see `bf16`
    RAGRPO_PACK     0 | 1        linear weights packed once into oneDNN's blocked layout on the CPU (the
                                 decode loop, the embedder); default: wherever oneDNN can pack the dtype
    RAGRPO_FP16     0 | 1        the decode loop's float32 linears hold fp16 weights for fbgemm's fp16 GEMM
                                 (activations and sums stay float32); default: measured, see `fp16`
    RAGRPO_ATTENTION eager | sdpa  transformers' attention in the fast engine's training passes; default:
                                 eager where they compute in bf16 on a CPU, else sdpa (see `attention`)
    RAGRPO_THREADS  N            torch's intra-op threads, set at the start of every command; default:
                                 torch's own
    RAGRPO_TRIM     0 | 1        hand freed heap pages back to the OS between ingest batches (glibc's
                                 malloc_trim); default: wherever the C library is glibc
    ONEDNN_PRIMITIVE_CACHE_CAPACITY N  oneDNN's own variable; ragrpo sets 64 where it is unset (see
                                 `ONEDNN_CACHE`), at import, before oneDNN reads it
    RAGRPO_OMP_RELEASE 0 | 1     `serve` ends its start-up thread's idle OpenMP workers before its engine
                                 thread decodes; default: wherever the OpenMP runtime can (see `release_openmp`)

Why measure bf16 instead of reading CPU flags: whether bf16 pays depends on more than AVX512-BF16 or AMX
being listed. oneDNN can be capped below what the CPU has (`ONEDNN_MAX_CPU_ISA`, `ATEN_CPU_CAPABILITY`),
a hypervisor can hide instructions, and on a CPU without them torch emulates bf16 at 2 to 4x the cost
of float32. So the first use on a machine times one training-sized matmul both ways (about 0.2 s) and
keeps the answer in the cache folder, keyed by everything that could change it. The decode loop's weight
format is measured the same way (`fp16`).

No other module reads /proc/cpuinfo or asks torch.ops.mkldnn what it supports.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from ragrpo import RagrpoError, cache_dir

# A decision counts bf16 as fast when its matmul takes at most this share of float32's. Measured on
# (256, 576) x (576, 1536): 0.44 on an AVX512-BF16 CPU without AMX, 5.5 on the same CPU capped to AVX2.
FAST_RATIO = 0.8
# The decode loop's float32 linears take fbgemm's fp16 weights when a 6-row gate/up matmul takes at most
# this share of the packed float32 one. Measured: 0.38 to 0.44 capped to AVX2, 0.51 to 0.67 on an AVX512-BF16 CPU.
FP16_RATIO = 0.8
# what can move the measurement: a cached answer is reused only while all of them are the same
_ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "DNNL_MAX_CPU_ISA")
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


# oneDNN keeps up to 1,024 compiled primitives by default, one per operation and shape, with their buffers.
# Training passes change shape every step (prompt and completion lengths), so the cache grows for hundreds of
# steps: two 200-step runs held 12-13 GB near their end and one was killed for memory. Over 30 steps, 64
# entries held the RSS at 5.0 GB against 5.9 and rising, at the same step time (NOTES.md, session 24, in
# bench/results/from-index). The decode loop's shapes repeat within a step, so 64 holds them.
ONEDNN_CACHE = "64"


def limit_onednn_cache() -> None:
    """Give oneDNN a 64-entry primitive cache unless the user set ONEDNN_PRIMITIVE_CACHE_CAPACITY. oneDNN reads
    the variable once, at its first primitive, so `ragrpo` calls this when it is imported."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE)


def _forced(name: str) -> bool | None:
    """The value of a 0|1 variable, or None where it is unset."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise RagrpoError(f"{name}={value!r}: use 0 or 1, or unset it to let ragrpo decide")
    return value == "1"


def cpu_flags() -> list[str]:
    """The CPU features that matter here (avx2, avx512f, avx512_bf16, amx_bf16, amx_tile), as Linux lists them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return []
    listed = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(set(listed) & set(_FLAGS))


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.machine())


@functools.cache
def device() -> str:
    """'cuda' or 'cpu'."""
    import torch

    value = os.environ.get("RAGRPO_DEVICE", "").strip()
    if value not in ("", "cpu", "cuda"):
        raise RagrpoError(f"RAGRPO_DEVICE={value!r}: use cpu or cuda, or unset it")
    if value == "cuda" and not torch.cuda.is_available():
        raise RagrpoError("RAGRPO_DEVICE=cuda, but torch sees no CUDA device here")
    return value or ("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def bf16() -> bool:
    """Whether bf16 matmuls are used where they are only a speed choice: RAGRPO_BF16 if set; on CUDA, whether
    the GPU supports bf16; on a CPU, whether a measured bf16 matmul beats float32 (`bf16_measurement`)."""
    forced = _forced("RAGRPO_BF16")
    if forced is not None:
        return forced
    if device() == "cuda":
        import torch

        return torch.cuda.is_bf16_supported()
    return bf16_measurement()["fast"]


def bf16_measurement() -> dict:
    """This machine's timing of one matmul in float32 and bf16, measured once and cached per machine."""
    return _measured("bf16", measure_bf16)


def _measured(name: str, measure) -> dict:
    """`measure()`'s answer for this machine: from the cache (`hardware.json`, one entry per machine key, one
    record per decision) or measured now and added to it."""
    key = _machine_key()
    path = cache_dir() / "hardware.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key) if isinstance(cached.get(key), dict) else {}
    if isinstance(entry.get(name), dict) and "fast" in entry[name]:
        return entry[name]
    result = measure()
    cached[key] = {**{k: v for k, v in entry.items() if isinstance(v, dict)}, name: result}
    try:  # a read-only cache folder costs a re-measurement next time, nothing else
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".tmp{os.getpid()}")
        partial.write_text(json.dumps(cached, indent=1))
        partial.replace(path)
    except OSError:
        pass
    return result


def measure_bf16(rows: int = 256, repeats: int = 5) -> dict:
    """Best-of-`repeats` milliseconds of (rows, 576) x (576, 1536), SmolLM2's gate/up shape, in both dtypes."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, 576, generator=generator).to(dtype)
        w = torch.randn(1536, 576, generator=generator).to(dtype)
        timings[str(dtype).removeprefix("torch.")] = _best_ms(lambda x=x, w=w: [F.linear(x, w) for _ in range(4)], 4,
                                                              repeats)
    return decide_bf16(timings["float32"], timings["bfloat16"])


def _best_ms(run, calls: int, repeats: int) -> float:
    """Milliseconds per call of `run` (which makes `calls` calls), best of `repeats` after one untimed run
    (allocation, kernel selection)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e3


def decide_bf16(float32_ms: float, bfloat16_ms: float) -> dict:
    return {"float32_ms": round(float32_ms, 4), "bfloat16_ms": round(bfloat16_ms, 4),
            "fast": bfloat16_ms <= FAST_RATIO * float32_ms}


def _machine_key() -> str:
    import torch

    parts = [cpu_name(), *cpu_flags(), torch.__version__, str(torch.get_num_threads()),
             *(f"{name}={os.environ.get(name, '')}" for name in _ISA_VARIABLES)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def can_pack(dtype) -> bool:
    """Whether oneDNN can pack CPU linear weights of `dtype` here: float32 wherever torch has oneDNN, bf16
    only where oneDNN has bf16 kernels (AVX512-BF16, AMX or AVX-NE-CONVERT)."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def pack(dtype) -> bool:
    """Whether CPU linear weights of `dtype` are packed for oneDNN: RAGRPO_PACK if set, else wherever they
    can be. For a handful of rows the packed matmul is about twice as fast as the plain one, in float32 and
    in bf16 (gate/up, 6 rows: 0.10 against 0.25 ms and 0.056 against 0.135 ms on an AVX512-BF16 CPU)."""
    if device() != "cpu":
        return False
    forced = _forced("RAGRPO_PACK")
    if forced is False:
        return False
    possible = can_pack(dtype)
    if forced and not possible:
        raise RagrpoError(f"RAGRPO_PACK=1, but oneDNN cannot pack {str(dtype).removeprefix('torch.')} weights "
                          "on this CPU; unset RAGRPO_PACK")
    return possible


def can_fp16() -> bool:
    """Whether fbgemm's fp16 GEMM is here (x86 CPUs with AVX2: fp16 weights, float32 activations and sums)."""
    import torch

    return device() == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines


@functools.cache
def fp16() -> bool:
    """Whether the decode loop's float32 linears hold their weights in fp16 (`RAGRPO_FP16` if set, else
    `fp16_measurement`). Decoding reads every weight once per token for a handful of rows, so it is bound by
    memory: half the bytes decode 6 x 128 tokens in 4.4 s against 8.1 s for packed float32 with the ISA capped
    to AVX2. The sampled distribution barely moves (KL 2.4e-6 from float32 on the packaged model, against
    1.3e-3 for bf16 weights and activations), and a row's result does not depend on its neighbours."""
    forced = _forced("RAGRPO_FP16")
    if forced and not can_fp16():
        raise RagrpoError("RAGRPO_FP16=1, but torch has no fbgemm fp16 GEMM here (x86 CPUs with AVX2 only); "
                          "unset RAGRPO_FP16")
    if forced is not None:
        return forced
    return can_fp16() and fp16_measurement()["fast"]


def fp16_measurement() -> dict:
    """This machine's timing of a decode-shaped matmul with fp16 and with packed float32 weights, cached."""
    return _measured("fp16_decode", measure_fp16)


def measure_fp16(rows: int = 6, copies: int = 8, repeats: int = 5) -> dict:
    """Best-of-`repeats` milliseconds of (rows, 576) x (576, 3072), SmolLM2's fused gate/up shape, over `copies`
    distinct weights (as a decode step reads 30 layers', not one from the cache): fp16 through fbgemm against
    float32 packed for oneDNN (plain where oneDNN cannot pack)."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 576, generator=generator)
    weights = [torch.randn(3072, 576, generator=generator) * 0.02 for _ in range(copies)]
    halves = [torch.ops.quantized.linear_prepack_fp16(w, None) for w in weights]
    if can_pack(torch.float32):
        packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]

        def float32():
            return [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], "") for w in packed]
    else:
        def float32():
            return [F.linear(x, w) for w in weights]

    fp16_ms = _best_ms(lambda: [torch.ops.quantized.linear_dynamic_fp16(x, w) for w in halves], copies, repeats)
    return decide_fp16(_best_ms(float32, copies, repeats), fp16_ms)


def decide_fp16(float32_ms: float, fp16_ms: float) -> dict:
    return {"float32_ms": round(float32_ms, 4), "fp16_ms": round(fp16_ms, 4), "fast": fp16_ms <= FP16_RATIO * float32_ms}


def decode_weights(dtype) -> str:
    """How the decode loop holds linear weights of `dtype` on this machine: 'fp16' (fbgemm, float32 models
    only), 'onednn' (packed into oneDNN's layout) or 'plain'."""
    import torch

    if dtype == torch.float32 and fp16():
        return "fp16"
    return "onednn" if pack(dtype) else "plain"


def attention(dtype) -> str:
    """transformers' attention implementation for the fast engine's training passes on a model computing in
    `dtype`: RAGRPO_ATTENTION if set, else 'eager' for bf16 on a CPU and 'sdpa' otherwise. On a CPU torch's
    fused attention is slow backwards in bf16: forward and backward over 30 layers of one GRPO step's shapes
    (6 x 129 queries over 278 keys, SmolLM2's 9 query and 3 key/value heads) took 0.71 to 0.94 s against
    eager's 0.30 s on an AVX512-BF16 CPU, and a whole step 8.4 against 9.0 s. In float32 the fused one is
    the faster (0.46 to 0.58 against 0.64 s), and on CUDA it is the flash kernel."""
    import torch

    value = os.environ.get("RAGRPO_ATTENTION", "").strip()
    if value not in ("", "eager", "sdpa"):
        raise RagrpoError(f"RAGRPO_ATTENTION={value!r}: use eager or sdpa, or unset it to let ragrpo decide")
    return value or ("eager" if device() == "cpu" and dtype == torch.bfloat16 else "sdpa")


def apply_threads(threads: int | None = None) -> None:
    """Set torch's intra-op threads: `threads`, else RAGRPO_THREADS; with neither, leave torch's default.
    Every `ragrpo` command calls it at start-up, so the variable holds for training and evaluation too."""
    value = threads if threads is not None else os.environ.get("RAGRPO_THREADS", "").strip() or None
    if value is None:
        return
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise RagrpoError(f"thread count {value!r}: use a whole number of at least 1")
    import torch

    torch.set_num_threads(count)


def set_threads(threads: int | None = None) -> int:
    """`apply_threads`, then start the one-thread worker of `small_job` (a server's, for its queries).
    Returns the count in force."""
    import torch

    apply_threads(threads)
    _small_jobs()  # the query worker's one thread is set here too, not per request
    return torch.get_num_threads()


@contextmanager
def cpu_workers(where: str):
    """On a CPU: as many single-threaded workers as torch has intra-op threads, for the block's duration.

    Two batches in two threads (torch releases the GIL inside ops) measured 2.3x faster than one
    batch at a time over two intra-op threads on a loaded 2-core machine: no synchronisation between
    the threads of one matmul, and a stalled core delays one batch instead of every op.
    """
    import torch

    if where != "cpu":
        yield 1
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


_STARTING = threading.Lock()
_POOL: list = []


def _small_jobs():
    import torch

    with _STARTING:  # the first queries of a server arrive together
        if not _POOL:
            count = torch.get_num_threads()
            pool = ThreadPoolExecutor(1, thread_name_prefix="ragrpo-small", initializer=torch.set_num_threads,
                                      initargs=(1,))
            # Start the thread and have it read its count now: a thread takes the process-wide count at its
            # first torch call, so after the caller's count is put back it would take that one.
            pool.submit(torch.get_num_threads).result()
            torch.set_num_threads(count)  # a thread started later would take the worker's count otherwise
            _POOL.append(pool)
    return _POOL[0]


def small_job(func, *args):
    """`func(*args)` on one worker thread that has one intra-op thread, set once when it starts.

    Embedding one short query is too small to gain from more threads, and on a busy machine two
    measured 5 to 15x slower (180 to 490 ms against 33 ms per query). torch's count is per thread, so
    the worker's leaves every other thread's alone; changing the caller's count around each query
    instead let concurrent server threads leave it at 1 for good. Jobs queue on the one worker.
    """
    return _small_jobs().submit(func, *args).result()


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim from the C library this process already runs on, or None (musl, macOS)."""
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def trim() -> bool:
    """Whether `release_memory` trims. Streaming ingest frees each batch's tensors, strings and Arrow
    buffers, but glibc keeps the freed pages inside its heaps, where torch's and LanceDB's threads
    interleave their allocations; without a trim the RSS of a 2,048-row-batch ingest rose about 40 MB
    per batch in a probe (`bench/ingest.py --untrimmed` compares)."""
    forced = _forced("RAGRPO_TRIM")
    if forced and _malloc_trim() is None:
        raise RagrpoError("RAGRPO_TRIM=1: this C library has no malloc_trim (it is glibc's); unset it")
    return _malloc_trim() is not None if forced is None else forced


def peak_memory_gib() -> float | None:
    """This process's peak resident memory so far, in GiB, where the OS reports it (Linux, macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**30 if platform.system() == "Darwin" else peak / 2**20


def release_memory() -> bool:
    """Return freed heap pages to the OS where `trim` says so (a few ms); True if it did."""
    if not trim():
        return False
    _malloc_trim()(0)
    return True


def _openmp_runtimes() -> list:
    """Each OpenMP runtime this process has mapped (libgomp from GCC 9, LLVM's libomp, Intel's libiomp5) that has
    `omp_pause_resource_all` (OpenMP 5.0): (that function, whether it ends the calling thread's team only,
    as libgomp's does; the others end every team). Several can be loaded at once: scikit-learn ships its own
    libgomp beside torch's. Read afresh each time (about a millisecond): a runtime can be loaded later."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return []
    paths = dict.fromkeys(line.split()[-1] for line in maps.splitlines() if line.count("/"))
    names = ("libgomp", "libomp", "libiomp5")
    runtimes = [_pause_function(path) for path in paths if Path(path).name.startswith(names)]
    return [runtime for runtime in runtimes if runtime is not None]


@functools.cache
def _pause_function(path: str):
    import ctypes

    try:
        pause = ctypes.CDLL(path).omp_pause_resource_all  # already loaded: the same handle as its users'
    except (OSError, AttributeError):
        return None
    return pause, Path(path).name.startswith("libgomp")


def release_openmp(*, others_may_compute: bool = False) -> bool:
    """End the calling thread's idle OpenMP workers (the runtime starts them again at its next parallel op);
    True if it did. RAGRPO_OMP_RELEASE=0 keeps them.

    Each thread that runs a parallel torch op owns a team of workers. libgomp lets workers spin between
    parallel regions only while all teams' threads fit the CPUs; past that they sleep, and each of the ~100
    regions of a decode step pays a wake-up. A server loads its model on the main thread and decodes on
    its engine's thread: two teams on 2 cores. Its decode took 32 ms a token there, against 25 ms with the
    main thread's team ended first (README, "Benchmark", session 19).

    Every loaded runtime is asked (which one torch uses is not known here; asking the others costs nothing).
    LLVM's and Intel's runtimes end every team, not only the caller's: with `others_may_compute` (another
    thread may be inside a parallel op now) only libgomp's are asked."""
    forced = _forced("RAGRPO_OMP_RELEASE")
    if forced is False:
        return False
    runtimes = _openmp_runtimes()
    if not runtimes:
        if forced:
            raise RagrpoError("RAGRPO_OMP_RELEASE=1: no OpenMP runtime with omp_pause_resource_all is loaded; "
                              "unset it")
        return False
    asked = [pause for pause, own_team_only in runtimes if own_team_only or not others_may_compute]
    return [pause(2) for pause in asked].count(0) > 0  # 2: omp_pause_hard


def summary() -> dict:
    """The decisions in force and what they rest on, for benchmark records and `ragrpo hardware`."""
    import torch

    record = {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "torch": torch.__version__,
              "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": device(),
              "threads": torch.get_num_threads(), "bf16": bf16(),
              "pack_float32": pack(torch.float32), "pack_bfloat16": pack(torch.bfloat16), "fp16_decode": fp16(),
              "decode_weights": {"float32": decode_weights(torch.float32),
                                 "bfloat16": decode_weights(torch.bfloat16)},
              "training_attention": {"float32": attention(torch.float32), "bfloat16": attention(torch.bfloat16)},
              "trim": trim(), "onednn_cache": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
              "omp_release": _forced("RAGRPO_OMP_RELEASE") is not False and bool(_openmp_runtimes()),
              "forced": {name: os.environ[name] for name in
                         ("RAGRPO_DEVICE", "RAGRPO_BF16", "RAGRPO_PACK", "RAGRPO_FP16", "RAGRPO_ATTENTION",
                          "RAGRPO_THREADS", "RAGRPO_TRIM", "RAGRPO_OMP_RELEASE",
                          *_ISA_VARIABLES)
                         if os.environ.get(name)}}
    if device() == "cpu" and _forced("RAGRPO_BF16") is None:
        record["bf16_measurement"] = bf16_measurement()
    if can_fp16() and _forced("RAGRPO_FP16") is None:
        record["fp16_measurement"] = fp16_measurement()
    return record


def reset() -> None:
    """Forget the decisions taken in this process (tests change the environment between them)."""
    device.cache_clear()
    bf16.cache_clear()
    fp16.cache_clear()
