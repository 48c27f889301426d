"""Per-device calibration of the planner's cost model, cached on disk.

The cost of one contraction step is modelled as

    time = overhead + max(flops / rate(d), bytes / bandwidth)

where `d` is the smallest of the step's GEMM dimensions (M, N, K): small inner or outer dimensions run far
below
peak, and this is what decides between a chain of thin GEMMs and one fat GEMM. A short micro-benchmark
measures
`overhead` (one tiny matmul call), `bandwidth` (a large copy) and `rate(d)` for a few values of `d`. The
result is
stored as JSON under $TNK_CACHE_DIR (default ~/.cache/tnkernels), keyed by device name, dtype, torch version
and
thread count, so that it runs once per machine; `recalibrate()` forces a new measurement.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

# Values of the smallest GEMM dimension at which the matmul rate is measured; rate() interpolates in log
# space.
_RATE_DIMS = (1, 4, 16, 64, 256)
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

    def rate(self, d: int) -> float:
        """Matmul FLOP/s when the smallest GEMM dimension is `d` (log-linear interpolation, clamped)."""
        dims = sorted(self.rates)
        if d <= dims[0]:
            return self.rates[dims[0]]
        if d >= dims[-1]:
            return self.rates[dims[-1]]
        import math

        for lo, hi in zip(dims, dims[1:], strict=False):
            if lo <= d <= hi:
                t = (math.log(d) - math.log(lo)) / (math.log(hi) - math.log(lo))
                return math.exp((1 - t) * math.log(self.rates[lo]) + t * math.log(self.rates[hi]))
        return self.rates[dims[-1]]  # pragma: no cover (the loop always returns)

    @property
    def peak(self) -> float:
        return max(self.rates.values())


def cache_dir() -> str:
    """Folder for calibration and other cached files: $TNK_CACHE_DIR, default ~/.cache/tnkernels."""
    return os.environ.get("TNK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tnkernels")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{torch.get_num_threads()}threads"


def _key(device: torch.device, dtype: torch.dtype) -> str:
    return f"{_device_name(device)}|{str(dtype).removeprefix('torch.')}|torch{torch.__version__}"


def _timeit(
    fn, device: torch.device, budget_s: float = 0.05, min_calls: int = 5, max_calls: int = 400
) -> float:
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


def measure(device: torch.device, dtype: torch.dtype, rounds: int = 3) -> Calibration:
    """Run the micro-benchmark (about 1-2 s on a CPU) and return the constants. Does not touch the disk cache.

    Every quantity is measured in `rounds` interleaved rounds and the best round is kept, so that a burst of
    load
    from another process spoils one round of one quantity rather than the whole calibration."""
    tiny_a = torch.randn(2, 2, device=device, dtype=dtype)
    tiny_b = torch.randn(2, 2, device=device, dtype=dtype)
    n_bytes = (8 << 20) if device.type == "cpu" else (256 << 20)
    src = torch.empty(n_bytes // dtype.itemsize, device=device, dtype=dtype).normal_()
    dst = torch.empty_like(src)
    # The budget of each rate measurement: enough FLOPs that the call overhead is negligible.
    budget = 8e6 if device.type == "cpu" else 4e9
    gemms = {}
    for d in _RATE_DIMS:
        big = max(64, int((budget / (2 * d)) ** 0.5) // 16 * 16)
        a = torch.randn(big, d, device=device, dtype=dtype)
        b = torch.randn(d, big, device=device, dtype=dtype)
        c = torch.empty(big, big, device=device, dtype=dtype)
        gemms[d] = (big, a, b, c)
    overhead = copy_t = float("inf")
    times = {d: float("inf") for d in _RATE_DIMS}
    for _ in range(rounds):
        overhead = min(overhead, _timeit(lambda: tiny_a @ tiny_b, device, budget_s=0.01))
        copy_t = min(copy_t, _timeit(lambda: dst.copy_(src), device))
        for d, (_, a, b, c) in gemms.items():
            # out= keeps page faults of a fresh output out of the rate; the bandwidth term prices memory
            # traffic.
            times[d] = min(times[d], _timeit(lambda a=a, b=b, c=c: torch.matmul(a, b, out=c), device))
    bandwidth = 2 * n_bytes / max(copy_t - overhead, 1e-9)  # a copy reads and writes every byte
    rates = {d: 2 * gemms[d][0] ** 2 * d / max(times[d] - overhead, 1e-9) for d in _RATE_DIMS}
    # Monotone in d: a fat GEMM is never slower per FLOP than a thin one; a lower measurement is load, not
    # truth.
    running = 0.0
    for d in _RATE_DIMS:
        running = max(running, rates[d])
        rates[d] = running
    return Calibration(str(device), str(dtype), overhead, bandwidth, rates)


def _path() -> str:
    return os.path.join(cache_dir(), "calibration.json")


def _read_all() -> dict[str, dict]:
    try:
        with open(_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_all(data: dict[str, dict]) -> None:
    """Atomic write: a temporary file in the same folder, then rename (readers never see half a file)."""
    folder = cache_dir()
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".calibration.", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, _path())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _from_json(d: dict) -> Calibration:
    return Calibration(
        device=d["device"],
        dtype=d["dtype"],
        overhead_s=float(d["overhead_s"]),
        bandwidth=float(d["bandwidth"]),
        rates={int(k): float(v) for k, v in d["rates"].items()},
        source="disk",
    )


def get_calibration(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Calibration:
    """The calibration of (device, dtype): from memory, else from the disk cache, else measured and stored."""
    device = torch.device(device)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"plan: cannot calibrate dtype {dtype}; use a floating dtype")
    key = _key(device, dtype)
    cal = _MEMO.get(key)
    if cal is not None:
        return cal
    with _LOCK:
        if key in _MEMO:
            return _MEMO[key]
        stored = _read_all().get(key)
        if stored is not None:
            try:
                cal = _from_json(stored)
            except (KeyError, TypeError, ValueError):
                cal = None
        if cal is None:
            cal = measure(device, dtype)
            data = _read_all()
            data[key] = asdict(cal)
            try:
                _write_all(data)
            except OSError:
                pass  # a read-only home must not break the forward pass; the calibration stays in memory
        _MEMO[key] = cal
        return cal


def recalibrate(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Calibration:
    """Measure again (e.g. after a driver change), replace the cached entry, and forget cached plans."""
    device = torch.device(device)
    key = _key(device, dtype)
    with _LOCK:
        cal = measure(device, dtype)
        data = _read_all()
        data[key] = asdict(cal)
        _write_all(data)
        _MEMO[key] = cal
    from .cache import clear_plans

    clear_plans()
    return cal


def set_calibration(
    cal: Calibration, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> None:
    """Install fixed constants (used by tests to make plan choices independent of the machine's noise)."""
    _MEMO[_key(torch.device(device), dtype)] = cal
    from .cache import clear_plans

    clear_plans()
