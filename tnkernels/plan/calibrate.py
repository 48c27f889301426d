"""Per-device calibration of the planner's cost model, cached on disk.

The cost of one contraction step is modelled as

    time = overhead + max(flops / rate(d), bytes / bandwidth)

where `d` is the smallest of the step's GEMM dimensions (M, N, K): small inner or outer dimensions run far below
peak, and this is what decides between a chain of thin GEMMs and one fat GEMM. A short micro-benchmark measures
`overhead` (one tiny matmul call), `bandwidth` (a large copy) and `rate(d)` for a few values of `d`. The result is
stored as JSON under $TNK_CACHE_DIR (default ~/.cache/tnkernels), keyed by device name, dtype, torch version and
thread count, so that it runs once per machine; `recalibrate()` forces a new measurement.
"""

from __future__ import annotations

import math
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from .disk import cache_dir, locked, read_json, update_json

# Values of the smallest GEMM dimension at which the matmul rate is measured; rate() interpolates in log
# space.
_RATE_DIMS = (1, 4, 16, 64, 256)
# A step moving more bytes than this is priced at the DRAM bandwidth (a typical last-level cache share per core).
_CACHE_BYTES = 16 << 20
# Size of the buffers that measure DRAM bandwidth and the page-fault cost: well above any cache and above glibc's
# largest mmap threshold (32 MiB), so every fresh buffer of this size is new pages.
_BIG_BYTES = 64 << 20
_LOCK = threading.Lock()
_MEMO: dict[str, Calibration] = {}


@dataclass
class Calibration:
    """Measured constants of one (device, dtype). Times in seconds, rates in FLOP/s, bandwidth in bytes/s."""

    device: str
    dtype: str
    overhead_s: float
    bandwidth: float
    rates: dict[int, float] = field(default_factory=dict)
    source: str = "measured"
    # Large working sets stream from DRAM, not from cache: bytes/s of a copy far bigger than the last-level cache
    # (0: use `bandwidth` for every size).
    dram_bandwidth: float = 0.0
    # A fresh CPU allocation above glibc's mmap threshold comes from new pages, and the first write to each page
    # faults; that first touch runs at `fault_bandwidth` bytes/s, an order of magnitude below a copy (0: free, as
    # with CUDA's caching allocator). It is what makes a plan with huge intermediates slow on a CPU.
    fault_bandwidth: float = 0.0
    fault_threshold_bytes: int = 32 << 20
    # A copy that permutes dimensions (a transpose) reads or writes with a stride and runs far below a plain
    # copy: bytes/s of a [N, M] -> [M, N] copy (0: use `bandwidth`).
    permute_bandwidth: float = 0.0
    # A sweep step core[M, K] @ state[B, K, N] runs as a batched matmul of B small products; its FLOP/s at
    # smallest dimension d (K or N) is far below one GEMM's: rates measured that way (empty: use `rates`).
    bmm_rates: dict[int, float] = field(default_factory=dict)
    # `rates` are measured with the inner dimension K small ([big, d] @ [d, big]). A GEMM whose output is
    # narrow ([big, big] @ [big, d], N small) or short (M small) runs at other rates, measured the same way.
    n_rates: dict[int, float] = field(default_factory=dict)
    m_rates: dict[int, float] = field(default_factory=dict)
    # A convolution does not run at its im2col GEMM's rate: the convolution library (oneDNN, cuDNN) and the BLAS
    # differ, by 2x on the EPYC VM (a 3x3 convolution at ~210 GFLOP/s on one thread, MKL's GEMM at ~105). The
    # measured rate of a convolution over the rate the GEMM tables give its shape, per kernel class ("1x1",
    # "kxk"; missing: 1).
    conv_scale: dict[str, float] = field(default_factory=dict)

    def memory_seconds(self, nbytes: float) -> float:
        """Time to move `nbytes` in one step: from cache when the step's traffic fits, else from DRAM."""
        bw = self.dram_bandwidth if (self.dram_bandwidth and nbytes > _CACHE_BYTES) else self.bandwidth
        return nbytes / bw

    def permute_seconds(self, nbytes: float) -> float:
        """Time to copy `nbytes` (read plus write) while permuting dimensions."""
        return nbytes / (self.permute_bandwidth or self.bandwidth)

    def fresh_seconds(self, allocations: tuple[float, ...]) -> float:
        """First-touch cost of the fresh tensors (sizes in bytes) a step allocates."""
        if not self.fault_bandwidth:
            return 0.0
        return sum(a for a in allocations if a >= self.fault_threshold_bytes) / self.fault_bandwidth

    def rate(self, d: int) -> float:
        """Matmul FLOP/s when the smallest GEMM dimension is `d` (log-linear interpolation, clamped)."""
        return _interpolate(self.rates, d)

    def gemm_rate(self, m: int, k: int, n: int) -> float:
        """FLOP/s of one [m, k] @ [k, n] GEMM: the rate of its smallest dimension in that dimension's role."""
        d = max(1, min(m, k, n))
        if n == d and n < k and self.n_rates:
            return _interpolate(self.n_rates, d)
        if m == d and m < k and self.m_rates:
            return _interpolate(self.m_rates, d)
        return _interpolate(self.rates, d)

    def conv_rate_scale(self, kernel_area: int) -> float:
        """How much faster than its im2col GEMM a convolution of `kernel_area` (kh * kw) runs."""
        return self.conv_scale.get("1x1" if kernel_area == 1 else "kxk", 1.0)

    def batched_rate(self, d: int) -> float:
        """FLOP/s of a broadcast batched matmul whose per-product smallest dimension is `d`."""
        return _interpolate(self.bmm_rates or self.rates, d)

    @property
    def peak(self) -> float:
        return max(self.rates.values())


def _interpolate(rates: dict[int, float], d: int) -> float:
    """rates[d], log-linear between the measured dimensions, clamped at both ends."""
    dims = sorted(rates)
    if d <= dims[0]:
        return rates[dims[0]]
    if d >= dims[-1]:
        return rates[dims[-1]]
    for lo, hi in zip(dims, dims[1:], strict=False):
        if lo <= d <= hi:
            t = (math.log(d) - math.log(lo)) / (math.log(hi) - math.log(lo))
            return math.exp((1 - t) * math.log(rates[lo]) + t * math.log(rates[hi]))
    return rates[dims[-1]]  # pragma: no cover (the loop always returns)


def _read_cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# Read once at import, a plain constant rather than a cached function: torch.compile traces the plan lookups that
# use it and warns about every functools-cached function it meets.
_CPU_MODEL = _read_cpu_model()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), part of every CPU cache key: a home folder carried to another
    machine must not bring that machine a calibration it did not measure."""
    return _CPU_MODEL


def machine_key() -> str:
    """This CPU, thread count and torch version: the key of what is measured per machine (calibrate.py keeps its
    own per device and dtype)."""
    return f"cpu:{cpu_model()}:{torch.get_num_threads()}threads|torch{torch.__version__}"


class MachineStore:
    """Choices measured on this machine, kept in $TNK_CACHE_DIR/<name> under machine_key(): a JSON dict of string
    keys. Written atomically under the cache folder's lock (disk.py: other processes' entries are kept); a missing
    or damaged file or entry reads as missing (measured again), and a read-only cache folder keeps the entries in
    memory only."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _path(self) -> str:
        return os.path.join(cache_dir(), self.name)

    def load(self) -> dict:
        stored = read_json(self._path()).get(machine_key(), {})
        return stored if isinstance(stored, dict) else {}

    def put(self, key: str, value) -> None:
        """Store one entry; never raises for an unwritable folder (the caller keeps the value in memory)."""
        machine = machine_key()

        def change(data: dict) -> bool:
            if not isinstance(data.get(machine), dict):
                data[machine] = {}  # a damaged entry (not a dict) is replaced, not indexed
            data[machine][key] = value
            return True

        update_json(self._path(), change)

    def get_or_measure(self, key: str, measure, valid=lambda value: True):
        """The stored value of `key` if `valid`, else measure() stored. Measured under the folder's lock, after
        reading the file again: processes starting together measure each entry once and all use that result."""
        found = self.load().get(key)
        if found is not None and valid(found):
            return found
        with locked(cache_dir()):
            found = self.load().get(key)
            if found is None or not valid(found):
                found = measure()
                self.put(key, found)
        return found

    def drop(self) -> None:
        """Forget this machine's entries (never raises for an unwritable folder)."""
        machine = machine_key()
        update_json(self._path(), lambda data: data.pop(machine, None) is not None)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{cpu_model()}:{torch.get_num_threads()}threads"


def _key(device: torch.device, dtype: torch.dtype) -> str:
    return f"{_device_name(device)}|{str(dtype).removeprefix('torch.')}|torch{torch.__version__}"


def _timeit(fn, device: torch.device, budget_s: float = 0.05, min_calls: int = 5, max_calls: int = 400) -> float:
    """Fastest single call, timing calls one by one until `budget_s` has passed.

    The minimum, not a mean or median: on a shared machine other processes only ever add time (a call that is
    preempted is slow, never fast), and the cost model wants what the hardware can do."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    start = time.perf_counter()
    calls = 0
    while calls < min_calls or (calls < max_calls and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return best


def outside_transforms(fn, *args):
    """fn(*args) where no torch.func transform is active: a first call made inside vmap / grad / jacrev measures
    (this calibration, the Tucker kind timing) on random tensors, with requires_grad_ and backward, which a
    transform refuses ("called random operation while in randomness error mode", "attempting to call
    Tensor.requires_grad_() inside of a function being transformed"). The transforms' state is per thread, so the
    measurement then runs on a fresh thread (no transform, grad mode on, no autocast) while this one waits; the
    measurement does not depend on the caller's modes. Outside a transform, fn runs here."""
    if not torch._C._are_functorch_transforms_active():
        return fn(*args)
    box = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    worker = threading.Thread(target=run, name="tnkernels-measure", daemon=True)
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def measure(device: torch.device, dtype: torch.dtype, rounds: int = 3) -> Calibration:
    """Run the micro-benchmark (about 1-2 s on a CPU) and return the constants. Does not touch the disk cache.

    Every quantity is measured in `rounds` interleaved rounds and the best round is kept, so that a burst of
    load from another process spoils one round of one quantity rather than the whole calibration."""
    tiny_a = torch.randn(2, 2, device=device, dtype=dtype)
    tiny_b = torch.randn(2, 2, device=device, dtype=dtype)
    n_bytes = (8 << 20) if device.type == "cpu" else (256 << 20)
    src = torch.empty(n_bytes // dtype.itemsize, device=device, dtype=dtype).normal_()
    dst = torch.empty_like(src)
    # The budget of each rate measurement: enough FLOPs that the call overhead is negligible.
    budget = 8e6 if device.type == "cpu" else 4e9
    gemms = {}  # role -> d -> (big, a, b, out): the role's dimension is d, the other two `big`
    for role in ("k", "n", "m"):
        gemms[role] = {}
        for d in _RATE_DIMS:
            big = max(64, int((budget / (2 * d)) ** 0.5) // 16 * 16)
            m, k, n = {"k": (big, d, big), "n": (big, big, d), "m": (d, big, big)}[role]
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)
            gemms[role][d] = (big, a, b, torch.empty(m, n, device=device, dtype=dtype))
    # a transposing copy of the same bytes: [rows, cols] -> [cols, rows]
    side = int((n_bytes // dtype.itemsize) ** 0.5)
    src_t = src[: side * side].view(side, side).t()
    dst_t = torch.empty(side, side, device=device, dtype=dtype)
    # broadcast batched matmul core[256, d] @ state[B, d, d], with B sized to the same FLOP budget
    bmms = {}
    for d in _RATE_DIMS:
        batch = max(1, int(budget / (2 * 256 * d * d)))
        bmms[d] = (
            batch,
            torch.randn(256, d, device=device, dtype=dtype),
            torch.randn(batch, d, d, device=device, dtype=dtype),
        )
    overhead = copy_t = perm_t = float("inf")
    times = {role: {d: float("inf") for d in _RATE_DIMS} for role in gemms}
    bmm_times = {d: float("inf") for d in _RATE_DIMS}
    for _ in range(rounds):
        overhead = min(overhead, _timeit(lambda: tiny_a @ tiny_b, device, budget_s=0.01))
        copy_t = min(copy_t, _timeit(lambda: dst.copy_(src), device))
        perm_t = min(perm_t, _timeit(lambda: dst_t.copy_(src_t), device))
        for role, by_d in gemms.items():
            for d, (_, a, b, c) in by_d.items():
                # out= keeps page faults of a fresh output out of the rate; the other terms price memory.
                t = _timeit(lambda a=a, b=b, c=c: torch.matmul(a, b, out=c), device)
                times[role][d] = min(times[role][d], t)
        for d, (_, core, state) in bmms.items():
            bmm_times[d] = min(bmm_times[d], _timeit(lambda a=core, b=state: torch.matmul(a, b), device))
    bandwidth = 2 * n_bytes / max(copy_t - overhead, 1e-9)  # a copy reads and writes every byte
    dram_bw, fault_bw = _measure_big_buffers(device, dtype, rounds)
    bandwidth = max(bandwidth, dram_bw)  # cache is never slower than DRAM: a lower number is load, not truth
    permute_bw = min(2 * side * side * dtype.itemsize / max(perm_t - overhead, 1e-9), bandwidth)
    role_rates = {
        role: {d: 2 * by_d[d][0] ** 2 * d / max(times[role][d] - overhead, 1e-9) for d in _RATE_DIMS}
        for role, by_d in gemms.items()
    }
    rates, n_rates, m_rates = role_rates["k"], role_rates["n"], role_rates["m"]
    # Monotone in d: a fat GEMM is never slower per FLOP than a thin one; a lower measurement is load, not
    # truth.
    bmm_rates = {d: 2 * b * 256 * d * d / max(bmm_times[d] - overhead, 1e-9) for d, (b, _, _) in bmms.items()}
    for table in (rates, n_rates, m_rates, bmm_rates):
        running = 0.0
        for d in _RATE_DIMS:
            running = max(running, table[d])
            table[d] = running
    cal = Calibration(
        str(device),
        str(dtype),
        overhead,
        bandwidth,
        rates,
        dram_bandwidth=dram_bw,
        fault_bandwidth=fault_bw,
        permute_bandwidth=permute_bw,
        bmm_rates=bmm_rates,
        n_rates=n_rates,
        m_rates=m_rates,
    )
    cal.conv_scale = _measure_conv_scale(cal, device, dtype, rounds)
    return cal


# Compute-bound convolutions of ResNet-like sizes, one per kernel class: (channels in, out, kernel, spatial side).
_CONV_PROBES = {"1x1": (128, 128, 1, 28), "kxk": (64, 64, 3, 28)}


def _measure_conv_scale(cal: Calibration, device: torch.device, dtype: torch.dtype, rounds: int) -> dict:
    """Per kernel class, the measured FLOP/s of a convolution over what gemm_rate gives its im2col shape,
    clamped to [0.25, 4] (beyond that it is load or a broken library, not a rate)."""
    scale = {}
    for name, (ci, co, k, side) in _CONV_PROBES.items():
        x = torch.randn(1, ci, side, side, device=device, dtype=dtype)
        w = torch.randn(co, ci, k, k, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(rounds):
            best = min(best, _timeit(lambda x=x, w=w, p=k // 2: torch.nn.functional.conv2d(x, w, padding=p), device))
        m, kk = side * side, ci * k * k
        measured = 2 * m * kk * co / max(best - cal.overhead_s, 1e-9)
        scale[name] = min(4.0, max(0.25, measured / cal.gemm_rate(m, kk, co)))
    return scale


def _measure_big_buffers(device: torch.device, dtype: torch.dtype, rounds: int) -> tuple[float, float]:
    """(DRAM copy bandwidth, first-touch bandwidth of fresh pages) in bytes/s; (0, 0) off the CPU, where the
    cache-sized copy already streams from device memory and the caching allocator reuses blocks."""
    if device.type != "cpu":
        return 0.0, 0.0
    n = _BIG_BYTES // dtype.itemsize
    src = torch.ones(n, dtype=dtype)
    dst = torch.empty_like(src).fill_(0)
    copy_t = fresh_t = float("inf")
    for _ in range(rounds):
        copy_t = min(copy_t, _timeit(lambda: dst.copy_(src), device, min_calls=3, max_calls=10))
        # torch.empty + fill: the fill writes every byte once into pages the kernel has to map first
        fill_t = _timeit(lambda: dst.fill_(1), device, min_calls=3, max_calls=10)
        fresh = _timeit(lambda: torch.empty(n, dtype=dtype).fill_(1), device, min_calls=3, max_calls=10)
        fresh_t = min(fresh_t, max(fresh - fill_t, 1e-9))
    dram = 2 * _BIG_BYTES / copy_t
    fault = _BIG_BYTES / fresh_t
    # Pages that cost nothing extra (an allocator that caches) would give a huge number: call it free.
    return dram, (0.0 if fault > 10 * dram else fault)


def _path() -> str:
    return os.path.join(cache_dir(), "calibration.json")


def _stored(key: str) -> Calibration | None:
    """The calibration stored for `key`, or None when missing, from an older version or damaged (any field of the
    wrong type: a file edited by hand or by another version must mean "measure again", never a crash)."""
    stored = read_json(_path()).get(key)
    if stored is None:
        return None
    try:
        return _from_json(stored)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _store(key: str, cal: Calibration) -> None:
    """Keep `cal` on disk next to the other entries; an unwritable folder warns once and keeps it in memory."""
    entry = asdict(cal)

    def change(data: dict) -> bool:
        data[key] = entry
        return True

    update_json(_path(), change)


def _from_json(d: dict) -> Calibration:
    return Calibration(
        device=d["device"],
        dtype=d["dtype"],
        overhead_s=float(d["overhead_s"]),
        bandwidth=float(d["bandwidth"]),
        rates={int(k): float(v) for k, v in d["rates"].items()},
        source="disk",
        dram_bandwidth=float(d["dram_bandwidth"]),
        fault_bandwidth=float(d["fault_bandwidth"]),
        fault_threshold_bytes=int(d.get("fault_threshold_bytes", 32 << 20)),
        permute_bandwidth=float(d["permute_bandwidth"]),
        bmm_rates={int(k): float(v) for k, v in d["bmm_rates"].items()},
        n_rates={int(k): float(v) for k, v in d["n_rates"].items()},
        m_rates={int(k): float(v) for k, v in d["m_rates"].items()},
        conv_scale={str(k): float(v) for k, v in d["conv_scale"].items()},  # older caches: measured again
    )


def _check_dtype(dtype) -> None:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"plan: cannot calibrate dtype {dtype}; use a floating dtype")


def get_calibration(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Calibration:
    """The calibration of (device, dtype): from memory, else from the disk cache, else measured and stored."""
    device = torch.device(device)
    _check_dtype(dtype)
    key = _key(device, dtype)
    cal = _MEMO.get(key)
    if cal is not None:
        return cal
    if device.type == "meta":
        return _nominal(device, dtype)
    with _LOCK:
        if key in _MEMO:
            return _MEMO[key]
        cal = _stored(key)
        if cal is None:
            # Across processes (torchrun ranks starting together): one measures while the others wait, then read
            # its result, so every process plans with the same constants, measured without the others' load.
            with locked(cache_dir()):
                cal = _stored(key)
                if cal is None:
                    cal = outside_transforms(measure, device, dtype)  # a first call may come inside torch.func.vmap
                    _store(key, cal)
        _MEMO[key] = cal
        return cal


def _nominal(device: torch.device, dtype: torch.dtype) -> Calibration:
    """Constants for the meta device, where a forward only works out shapes: nothing runs, so nothing can be
    timed (timing meta ops stored nonsense, a zero DRAM bandwidth among it, in the cache file). Any plan gives the
    same shapes; these give the planner's ordinary choices."""
    return Calibration(
        device=str(device), dtype=str(dtype), overhead_s=1e-6, bandwidth=1e11, rates={1: 1e11}, source="nominal"
    )


def recalibrate(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Calibration:
    """Measure again (e.g. after a driver change), replace the cached entry, and forget cached plans."""
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("recalibrate: nothing runs on the meta device, so there is nothing to measure")
    _check_dtype(dtype)  # before measuring: "normal_kernel_cpu" not implemented for 'Int'
    key = _key(device, dtype)
    with _LOCK, locked(cache_dir()):
        cal = measure(device, dtype)
        _store(key, cal)  # a read-only cache folder keeps it in memory: it used to raise and install nothing
        _MEMO[key] = cal
    from .cache import clear_plans

    clear_plans()
    return cal


def set_calibration(cal: Calibration, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """Install fixed constants (used by tests to make plan choices independent of the machine's noise)."""
    _MEMO[_key(torch.device(device), dtype)] = cal
    from .cache import clear_plans

    clear_plans()
