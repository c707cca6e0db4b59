"""The defaults minigmr takes from the machine, each overridable: the dtype (bf16 where the CPU multiplies it fast)
and the CPU thread count (the idle cores, not all cores), both read from the kernel, never guessed from a vendor name;
and, for work on a CPU, an allocator that keeps freed memory for reuse."""

import contextlib
import ctypes
import os
import platform
import time

import torch

# Instruction-set flags (Linux /proc/cpuinfo, as `lscpu` prints them) that make bf16 matmuls faster than fp32 on a CPU:
# AMX tiles (Sapphire Rapids and later) and AVX512-BF16 (Cooper Lake, Zen 4). Without them oneDNN emulates bf16.
FAST_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> set:
    """The first processor's flags; an empty set where the file does not exist (not Linux) or has no flags line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86 / ARM spelling
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model(path: str = "/proc/cpuinfo") -> str:
    """The CPU's model name and logical CPU count, which every measured number depends on."""
    try:
        with open(path) as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        name = None
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


def fast_bf16_cpu(flags: set | None = None) -> bool:
    return any(flag in (cpu_flags() if flags is None else flags) for flag in FAST_BF16_FLAGS)


def default_dtype(device: torch.device, flags: set | None = None) -> torch.dtype:
    """bf16 on CUDA and on CPUs with fast bf16, fp32 elsewhere (a bf16 matmul emulated in fp32 is slower than fp32)."""
    if device.type == "cuda" or (device.type == "cpu" and fast_bf16_cpu(flags)):
        return torch.bfloat16
    return torch.float32


def allowed_cores() -> set:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def busy_cores(window: float = 0.25, stat: str = "/proc/stat", cores: set | None = None) -> float | None:
    """How many of the cores this process may run on (`cores`, default its affinity) other processes kept busy over
    `window` seconds, from their `cpuN` lines in Linux proc(5); None where that file cannot be read."""
    cores = allowed_cores() if cores is None else cores

    def read():  # {core: (total jiffies, idle + iowait)} over user..steal (guest time is already in user)
        out = {}
        with open(stat) as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                    v = [int(x) for x in fields[:8]]
                    out[int(name[3:])] = (sum(v), v[3] + v[4])
        return out

    try:
        before, _ = read(), time.sleep(window)
        after = read()
    except (OSError, ValueError):
        return None
    if not after:
        return None
    return sum(1 - (after[c][1] - before[c][1]) / max(after[c][0] - before[c][0], 1) for c in after if c in before)


def choose_threads(requested: int | None = None, busy: float | None = None) -> int:
    """`requested` if given; else the OMP_NUM_THREADS the user set; else the cores not busy with other work (at least
    1); under torchrun (LOCAL_WORLD_SIZE > 1) this process's share of its cores, unmeasured, since its sibling
    processes are busy starting up at that moment. Why: torch's OpenMP threads spin at every barrier, so one thread
    per core that another process also uses makes a small model many times slower instead of twice; taking only
    idle cores keeps a loaded machine's slowdown graceful."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) >= 1:
        return int(os.environ["OMP_NUM_THREADS"])
    cores, local = len(allowed_cores()), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local > 1:
        return max(1, cores // local)
    busy = busy_cores() if busy is None else busy
    return cores if busy is None else max(1, min(cores, round(cores - busy)))


def set_threads(requested: int | None = None) -> int:
    """Apply choose_threads to torch (CPU work only; a no-op for what runs on CUDA) and return the count."""
    n = choose_threads(requested)
    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def pinned_threads(n: int = 1):
    """torch on exactly n CPU threads inside the block, then as before: float sums then run in one fixed order, so
    what is trained inside is a pure function of the seed on a given CPU type, whatever the core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reuse_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for the next allocation instead of giving it back to the kernel;
    True where that took effect (Linux with glibc), else False, changing nothing. Why: by default a buffer of more
    than 128 KiB (a threshold that only grows as such buffers are freed) is mapped fresh and unmapped when freed, and
    freed memory at the top of the heap is returned, so CPU inference, which frees and re-allocates its activations
    for every batch, page-faults (and the kernel zeroes) them again each time. What vLLM's CPU backend gets by
    preloading tcmalloc. The setting is process-wide: memory freed after a peak stays with the process for reuse."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    # 32 MiB: the largest mmap threshold glibc accepts on 64-bit; both set together (one alone fixes the other at
    # its small default)
    return mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
