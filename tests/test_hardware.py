"""minigmr.hardware: the dtype and thread defaults follow the kernel's flags and load, and explicit choices win."""
import pytest
import torch

from minigmr import hardware


def test_cpu_flags_parses_the_first_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert hardware.cpu_flags(str(info)) == {"fpu", "sse2", "avx512f", "amx_bf16"}
    assert hardware.cpu_flags(str(tmp_path / "missing")) == set()


@pytest.mark.parametrize("flags, fast", [({"avx2", "avx512f"}, False), ({"avx512f", "avx512_bf16"}, True),
                                         ({"amx_tile", "amx_bf16"}, True), (set(), False)])
def test_default_dtype_from_flags(flags, fast):
    assert hardware.fast_bf16_cpu(flags) is fast
    assert hardware.default_dtype(torch.device("cpu"), flags) == (torch.bfloat16 if fast else torch.float32)
    assert hardware.default_dtype(torch.device("cuda"), flags) == torch.bfloat16  # whatever the host CPU


def test_choose_threads_takes_the_idle_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(hardware, "allowed_cores", lambda: {0, 1})
    assert hardware.choose_threads(busy=0.0) == 2
    assert hardware.choose_threads(busy=0.9) == 1    # another process on one core: do not share it
    assert hardware.choose_threads(busy=2.0) == 1    # never fewer than one
    assert hardware.choose_threads(3, busy=2.0) == 3  # an explicit count wins
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert hardware.choose_threads(busy=0.0) == 1    # torchrun: this process's share, whatever the load
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert hardware.choose_threads(busy=2.0) == 2    # the user's environment wins
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        hardware.choose_threads(0)


def test_busy_cores_reads_the_allowed_cores_stat_delta(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    # per core: user nice system idle iowait irq softirq steal guest guest_nice. Over the window core 0 is fully
    # busy (100 jiffies, none idle), core 1 idle (100 of 100), core 2 busy but not ours; the cpu line is ignored.
    stat.write_text("cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 100 0 0 100 0 0 0 0 0 0\ncpu1 0 0 0 200 0 0 0 0 0 0\n"
                    "cpu2 0 0 0 0 0 0 0 0 0 0\nintr 5\n")
    monkeypatch.setattr(hardware.time, "sleep", lambda s: stat.write_text(
        "cpu  9 9 9 9 9 9 9 9 9 9\ncpu0 200 0 0 100 0 0 0 0 50 0\ncpu1 0 0 0 300 0 0 0 0 0 0\n"
        "cpu2 100 0 0 0 0 0 0 0 0 0\nintr 9\n"))
    assert hardware.busy_cores(stat=str(stat), cores={0, 1}) == pytest.approx(1.0)
    assert hardware.busy_cores(stat=str(tmp_path / "missing"), cores={0, 1}) is None


def test_pinned_threads_sets_and_restores_the_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)

        @hardware.pinned_threads(1)
        def inside():
            return torch.get_num_threads()

        assert inside() == 1 and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), hardware.pinned_threads(1):
            raise RuntimeError("an error inside the block still restores the count")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_reuse_freed_memory_keeps_pages():
    """Where glibc takes the setting, buffers freed and re-allocated (as inference does per batch) come back without
    page faults (each fault maps and zeroes one fresh page). Run in a fresh interpreter: the heap's history decides
    where a buffer lands."""
    import platform
    import subprocess
    import sys
    applied = hardware.reuse_freed_memory()
    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    if not applied:
        pytest.skip("not glibc: nothing to check")
    assert hardware.reuse_freed_memory()  # idempotent
    code = """if True:
        import resource, torch
        from minigmr.hardware import reuse_freed_memory
        assert reuse_freed_memory()
        faults = []
        for _ in range(8):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            bufs = [torch.ones(3 << 20) for _ in range(3)]  # three 12 MiB buffers, touched, then freed
            del bufs
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(faults)"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    faults = [int(x) for x in out.strip()[1:-1].split(",")]
    assert sum(faults[4:]) < 100, faults  # fresh pages for 36 MiB would be 9216 faults per round
