"""The benchmark harness every kernel family shares (DESIGN section 7).

A family (e.g. benchmarks/gumbel.py) builds one callable per (op, backend, dtype, shape, mode, variant) and
states the MINIMUM bytes the op must move and flops it must do; `Suite.measure` times it, measures its peak
extra memory and keeps a record. `Suite.finish` computes the ratios that need several records of the same
case measured side by side in this run (speed-up over PyTorch eager and over torch.compile, memory ratios,
fraction of the device-to-device copy bandwidth on GPU), writes the JSON and a text summary.

Timing
    GPU: CUDA events around each call, L2 flushed (a 256 MiB write) between calls outside the events,
         `warmup` untimed calls first; the figure is the median of `repeats` calls.
    CPU: time.perf_counter around each call; median of `repeats` calls. Calls take seconds there, so the
         one untimed call before them is the memory measurement below (torch.compile gets one more, its
         compilation); `warmup` adds more.
    Both: the memory call comes after the warm-up calls and before the timed ones.
    Under TRITON_INTERPRET nothing is timed: the harness refuses (InterpreterRefused).

Peak extra memory (bytes allocated by one call beyond what was live before it: the inputs, and for mode
"bwd" the forward's graph; outputs and gradients the call returns count, since the call allocated them)
    GPU: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before.
    CPU: the torch profiler's allocation events (profile_memory=True: every allocation and free through
         PyTorch's CPU allocator c10, with its size), summed in time order; the peak of that running sum.
         Cross-check in the same call: the process's peak resident set (VmHWM, reset through
         /proc/self/clear_refs) minus the resident set before. The RSS figure also sees memory that does
         not go through c10 (e.g. std::vector scratch in a C++ kernel, thread stacks) and pages returned late
         by the C library; it is meaningful only for blocks above glibc's mmap threshold (<= 32 MiB; the
         benchmark tensors are >= 134 MB): smaller freed blocks stay in the heap and are reused unseen.
         Both are recorded, the profiler figure is `peak_extra_bytes`; records with a peak >= 128 MiB whose
         two figures differ by more than 10% are flagged `memory_methods_disagree`.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
MODES = ("fwd", "bwd", "fwd+bwd")
PEER_EAGER = "torch"  # PyTorch's own eager implementation: the baseline of "speed-up over eager"
PEER_COMPILE = "torch.compile"  # torch.compile of that same implementation
PEERS = (PEER_EAGER, PEER_COMPILE)
# Ratio keys per peer: (backend name, key in speedup_vs_<key> / memory_vs_<key>, column label of the summary).
# A family with other peers (e.g. attention: masked SDPA, FlexAttention) passes its own list to Suite.
DEFAULT_PEERS = ((PEER_EAGER, "torch", "torch"), (PEER_COMPILE, "compile", "comp"))
MEMORY_DISAGREEMENT = 0.10  # CPU: flag a record whose profiler and RSS peaks differ by more than this...
MEMORY_CHECK_MIN_BYTES = 128 << 20  # ...when the peak is this large: smaller blocks come from glibc's heap
# (below its mmap threshold, at most 32 MiB), which reuses freed pages without returning them, so RSS
# does not see them; blocks above it are mmap'ed on allocation and unmapped on free.


class InterpreterRefused(RuntimeError):
    """Raised when asked to time anything under TRITON_INTERPRET: interpreter timings mean nothing."""


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def refuse_interpreter() -> None:
    if interpreter_active():
        raise InterpreterRefused(
            "TRITON_INTERPRET is set: runs under the Triton interpreter are never timed; unset it to benchmark"
        )


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ----------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        import cpuinfo  # py-cpuinfo, optional

        return cpuinfo.get_cpu_info().get("brand_raw") or platform.processor()
    except Exception:
        return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_kind(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


def machine_info(device: torch.device) -> dict:
    """What the figures were measured on: enough to tell two runs' machines apart."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    status = _git("status", "--porcelain", "--untracked-files=no")
    info = {
        "kind": machine_kind(device),
        "device": str(device),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_num_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "commit": _git("rev-parse", "HEAD"),
        "commit_dirty": bool(status) if status is not None else None,
        "loadavg_at_start": _loadavg(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import dalle_fast

        info["dalle_fast_C"] = dalle_fast.load() is not None
        info["dalle_fast_C_error"] = dalle_fast.load_error
    except Exception as e:  # the harness still describes the machine
        info["dalle_fast_C_error"] = f"{type(e).__name__}: {e}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            {
                "device_name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "multiprocessors": p.multi_processor_count,
                "device_memory_bytes": p.total_memory,
                "driver": _nvidia_driver(),
            }
        )
    else:
        info["device_name"] = info["cpu_model"]
    return info


def machine_slug(info: dict) -> str:
    """File-name part: gpu-nvidia-h200, cpu-amd-epyc-2cores. CPU and GPU runs never share a file."""
    if info["kind"] == "gpu":
        return "gpu-" + _slug(info["device_name"])
    return f"cpu-{_slug(info['cpu_model'])}-{info['cpu_affinity']}cores"


@contextlib.contextmanager
def terminate_as_interrupt():
    """Within the block SIGTERM raises KeyboardInterrupt, so a runner stopped by `timeout` still writes."""

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# -------------------------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _L2Flush:
    """Writes 256 MiB between timed GPU calls so no call starts with its inputs already in L2."""

    def __init__(self, device: torch.device):
        self.buf = torch.empty(256 << 20, dtype=torch.uint8, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


def time_calls(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, flush: Callable[[], None] | None = None
) -> tuple[list[float], float]:
    """Seconds of each of `repeats` timed calls, and of the first (cold) call."""
    refuse_interpreter()
    cold = None
    for i in range(max(warmup, 0)):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        if i == 0:
            cold = time.perf_counter() - t0
        del out
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            if flush is not None:
                flush()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
            del out
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            del out
    if cold is None:
        cold = times[0] if times else float("nan")
    return times, cold


def _proc_status(*keys: str) -> dict[str, int]:
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                found[k] = int(v.split()[0]) * 1024
    return found


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def cpu_peak_extra(fn: Callable[[], object]) -> dict:
    """One call under the profiler (c10 allocation events) and the RSS high-water mark; see the module doc."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    rss_ok = _reset_peak_rss()
    before = _proc_status("VmRSS")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    after = _proc_status("VmHWM")
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda t: t[0])
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    res = {
        "peak_extra_bytes": int(peak),
        "memory_method": "torch.profiler CPU allocation events (c10)",
        "allocation_events": len(events),
    }
    if rss_ok and "VmRSS" in before and "VmHWM" in after:
        res["peak_extra_bytes_rss"] = int(max(after["VmHWM"] - before["VmRSS"], 0))
    return res


def cuda_peak_extra(fn: Callable[[], object], device: torch.device) -> dict:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    peak = torch.cuda.max_memory_allocated(device) - base
    return {"peak_extra_bytes": int(peak), "memory_method": "torch.cuda.max_memory_allocated - allocated before"}


def peak_extra(fn: Callable[[], object], device: torch.device) -> dict:
    refuse_interpreter()
    return cuda_peak_extra(fn, device) if device.type == "cuda" else cpu_peak_extra(fn)


# ------------------------------------------------------------------------------------------------ suite


def _case_key(r: dict) -> tuple:
    return (r["op"], r["dtype"], tuple(r["shape"]), r["mode"], json.dumps(r["variant"], sort_keys=True))


class Suite:
    """Collects one family's records for one device and writes them.

    `measure(...)` never raises for a failing backend: it records status "error" with the message (and the
    caller decides whether that fails a test). Past `time_budget_s` every further case is recorded as
    skipped, so the results are always written.
    """

    def __init__(
        self,
        family: str,
        device: torch.device | str,
        *,
        smoke: bool = False,
        quick: bool = False,
        warmup: int | None = None,
        repeats: int | None = None,
        out_dir: str | Path | None = None,
        time_budget_s: float | None = None,
        notes: list[str] | None = None,
        peers: tuple[tuple[str, str, str], ...] = DEFAULT_PEERS,
    ):
        refuse_interpreter()
        self.peers = tuple(peers)
        self.family = family
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.smoke = smoke
        self.quick = quick  # families read it: a quick run measures fewer cases
        cpu = self.device.type == "cpu"
        # CPU: the profiled memory call is the warm-up (calls take seconds there); torch.compile gets one
        # more untimed call first, its compilation. GPU: `warmup` calls, then the memory call.
        self.warmup = warmup if warmup is not None else (0 if cpu else 1 if smoke else 10)
        self.repeats = repeats if repeats is not None else (1 if smoke else 3 if cpu else 50)
        self.out_dir = Path(out_dir) if out_dir else RESULTS_DIR
        self.started = time.monotonic()
        self.deadline = self.started + time_budget_s if time_budget_s else None
        self.notes = list(notes or [])
        self.records: list[dict] = []
        self.machine = machine_info(self.device)
        self._flush = _L2Flush(self.device) if self.device.type == "cuda" else None
        if self.device.type == "cpu":  # the profiler's first session loads libraries: keep that out of RSS
            cpu_peak_extra(lambda: None)
        self._copy_cache: dict[int, float] = {}

    # -- time budget
    def time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    # -- records
    def _base(self, op, backend, dtype, shape, mode, variant) -> dict:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        return {
            "op": op,
            "backend": backend,
            "dtype": dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype,
            "shape": list(shape),
            "mode": mode,
            "variant": dict(variant),
        }

    def skip(self, *, op, backend, dtype, shape, mode, variant, reason: str) -> dict:
        rec = self._base(op, backend, dtype, shape, mode, variant)
        rec.update(status="skipped", reason=reason)
        self.records.append(rec)
        return rec

    def measure(
        self,
        *,
        op: str,
        backend: str,
        dtype,
        shape,
        mode: str,
        variant: dict,
        make: Callable[[], Callable[[], object]],
        nbytes: int,
        flops: int,
        notes: str | None = None,
    ) -> dict:
        """Time `make()()`: make builds the inputs (untimed) and returns the call to time."""
        rec = self._base(op, backend, dtype, shape, mode, variant)
        rec.update(bytes=int(nbytes), flops=int(flops))
        if notes:
            rec["notes"] = notes
        if self.time_left() <= 0:
            rec.update(status="skipped", reason="time budget spent")
            self.records.append(rec)
            return rec
        fn = None
        try:
            fn = make()
            warmup = max(self.warmup, 1) if backend == PEER_COMPILE else self.warmup
            cold = None
            if warmup:
                _, cold = time_calls(fn, self.device, warmup, 0)
            t0 = time.perf_counter()
            rec.update(peak_extra(fn, self.device))
            if cold is None:
                cold = time.perf_counter() - t0  # the profiled memory call was the first
            times, _ = time_calls(fn, self.device, 0, self.repeats, self._flush)
            med = statistics.median(times)
            rec.update(
                status="ok",
                times_s=times,
                median_s=med,
                min_s=min(times),
                first_call_s=cold,
                warmup=warmup,
                repeats=self.repeats,
                gbps=nbytes / med / 1e9,
                tflops=flops / med / 1e12,
            )
            if "peak_extra_bytes_rss" in rec and rec["peak_extra_bytes"] >= MEMORY_CHECK_MIN_BYTES:
                rel = abs(rec["peak_extra_bytes_rss"] - rec["peak_extra_bytes"]) / rec["peak_extra_bytes"]
                rec["memory_methods_disagree"] = rel > MEMORY_DISAGREEMENT
        except InterpreterRefused:
            raise
        except Exception as e:  # recorded, reported; the suite goes on
            rec.update(status="error", reason=f"{type(e).__name__}: {str(e)[:2000]}")
        finally:
            del fn
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.records.append(rec)
        return rec

    def copy_gbps(self, nbytes: int) -> float | None:
        """GB/s of a device-to-device copy moving `nbytes` (nbytes/2 read, nbytes/2 written), same timer."""
        if self.device.type != "cuda":
            return None
        half = max(int(nbytes) // 2, 1)
        if half not in self._copy_cache:
            try:
                src = torch.empty(half, dtype=torch.uint8, device=self.device).random_(0, 255)
                dst = torch.empty_like(src)

                def copy():
                    dst.copy_(src)

                times, _ = time_calls(copy, self.device, self.warmup, self.repeats, self._flush)
                self._copy_cache[half] = 2 * half / statistics.median(times) / 1e9
                del src, dst
                torch.cuda.empty_cache()
            except Exception:
                self._copy_cache[half] = float("nan")
        return self._copy_cache[half]

    # -- ratios and output
    def _ratios(self) -> None:
        by_case: dict[tuple, dict[str, dict]] = {}
        for r in self.records:
            if r.get("status") == "ok":
                by_case.setdefault(_case_key(r), {})[r["backend"]] = r
        for recs in by_case.values():
            for r in recs.values():
                for peer, key, _ in self.peers:
                    base = recs.get(peer)
                    if base is None:
                        continue
                    r[f"speedup_vs_{key}"] = base["median_s"] / r["median_s"]
                    if base.get("peak_extra_bytes"):
                        r[f"memory_vs_{key}"] = r["peak_extra_bytes"] / base["peak_extra_bytes"]
                if self.device.type == "cuda":
                    cb = self.copy_gbps(r["bytes"])
                    if cb:
                        r["copy_gbps"] = cb
                        r["fraction_of_copy"] = r["gbps"] / cb

    def result_stem(self) -> str:
        return f"{machine_slug(self.machine)}-{self.family}" + ("-smoke" if self.smoke else "")

    def finish(self, goals: Callable[[list[dict], str], list[dict]] | None = None) -> dict:
        """Ratios, goals, JSON and summary. Returns {"json": path, "summary": path, "text": summary}."""
        self._ratios()
        self.machine["loadavg_at_end"] = _loadavg()
        goal_rows = goals(self.records, machine_kind(self.device)) if goals else []
        doc = {
            "family": self.family,
            "smoke": self.smoke,
            "quick": self.quick,
            "machine": self.machine,
            "settings": {
                "warmup": self.warmup,
                "repeats": self.repeats,
                "timer": "CUDA events, L2 flushed between calls" if self.device.type == "cuda" else "time.perf_counter",
                "statistic": "median",
                "elapsed_s": round(time.monotonic() - self.started, 1),
            },
            "memory": __doc__.split("Peak extra memory", 1)[1].split('"""')[0].strip(),
            "notes": self.notes,
            "peers": [list(p) for p in self.peers],
            "goals": goal_rows,
            "records": self.records,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self.result_stem()
        jpath, spath = self.out_dir / f"{stem}.json", self.out_dir / f"{stem}.txt"
        text = summary_text(doc)
        jpath.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        spath.write_text(text)
        return {"json": jpath, "summary": spath, "text": text, "doc": doc}


# ------------------------------------------------------------------------------------------------ text


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)


def _fmt(x, spec=".2f", suffix="") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def summary_text(doc: dict) -> str:
    m = doc["machine"]
    peers = [tuple(p) for p in doc.get("peers") or DEFAULT_PEERS]
    lines = [
        f"{doc['family']} benchmarks{' (SMOKE: tiny shapes, 1 repeat; figures meaningless)' if doc['smoke'] else ''}",
        f"machine: {m['kind']} {m.get('device_name')} | cpu {m['cpu_model']} x{m['cpu_affinity']} "
        f"(torch threads {m['torch_num_threads']}) | torch {m['torch']} cuda {m['torch_cuda']} "
        f"triton {m['triton']} | load {m.get('loadavg_at_start')} -> {m.get('loadavg_at_end')} "
        f"| commit {str(m['commit'])[:10]}{'+dirty' if m['commit_dirty'] else ''} | {m['date']}",
        f"timing: median of {doc['settings']['repeats']} after {doc['settings']['warmup']} warm-up + 1 memory call "
        f"({doc['settings']['timer']}); vs X = speed-up over peer X measured in this run ("
        + ", ".join(f"{label} = {peer}" for peer, _, label in peers)
        + "); mem = peak extra bytes of one call",
    ]
    lines += [f"note: {n}" for n in doc["notes"]]
    gpu = m["kind"] == "gpu"
    key1, label1 = (peers[0][1], peers[0][2]) if peers else (None, "-")
    vs_w = [max(9, len(label) + 5) for _, _, label in peers]  # one speed-up column per peer
    variants = [",".join(f"{k}={v}" for k, v in r["variant"].items() if k != "tau") for r in doc["records"]]
    var_w = max([18] + [len(v) + 2 for v in variants])
    tiles = any("tflops_computed" in r for r in doc["records"])  # sparse attention: work on computed tiles
    hdr = (
        f"{'op':<17}{'variant':<{var_w}}{'dtype':<9}{'shape':<18}{'mode':<8}{'backend':<14}{'median':>10}"
        f"{'GB/s':>9}{'TFLOP/s':>9}"
        + "".join(f"{'vs ' + label:>{w}}" for (_, _, label), w in zip(peers, vs_w))
        + f"{'mem':>9}{'mem/' + label1:>10}"
        + (f"{'%copy':>7}" if gpu else f"{'mem(rss)':>10}")
        + (f"{'TF/s tiles':>11}{'tiles':>7}" if tiles else "")
    )
    lines += ["", hdr, "-" * len(hdr)]
    for r, variant in zip(doc["records"], variants):
        head = (
            f"{r['op']:<17}{variant:<{var_w}}{r['dtype']:<9}{'x'.join(map(str, r['shape'])):<18}{r['mode']:<8}"
            f"{r['backend']:<14}"
        )
        if r.get("status") != "ok":
            lines.append(head + f"  {r.get('status', '?').upper()}: {r.get('reason', '')[:90]}")
            continue
        med = r["median_s"]
        t = f"{med * 1e3:.3f}ms" if med < 10 else f"{med:.2f}s"
        tail = (
            f"{_fmt(r.get('fraction_of_copy'), '.0%'):>7}"
            if gpu
            else f"{_fmt_bytes(r.get('peak_extra_bytes_rss')):>10}"
        )
        if tiles:
            tail += f"{_fmt(r.get('tflops_computed'), '.3g'):>11}{_fmt(r.get('computed_fraction'), '.0%'):>7}"
        lines.append(
            head
            + f"{t:>10}{r['gbps']:>9.1f}{r['tflops']:>9.3g}"
            + "".join(f"{_fmt(r.get(f'speedup_vs_{key}'), '.2f', 'x'):>{w}}" for (_, key, _), w in zip(peers, vs_w))
            + f"{_fmt_bytes(r.get('peak_extra_bytes')):>9}{_fmt(r.get(f'memory_vs_{key1}'), '.2f', 'x'):>10}"
            + tail
        )
    if doc["goals"]:
        lines += ["", "goals:"]
        for g in doc["goals"]:
            lines.append(
                f"  {g['status']:<5} {g['goal']}: measured {g['measured']} (target {g['target']})"
                + (f" [{g['detail']}]" if g.get("detail") else "")
            )
    counts = {}
    for r in doc["records"]:
        counts[r.get("status")] = counts.get(r.get("status"), 0) + 1
    lines += [
        "",
        "records: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=str)),
        f"elapsed: {doc['settings']['elapsed_s']} s",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- family runners


def common_settings() -> dict:
    """The DALLE_FAST_BENCH_* settings every family reads (the pytest wrappers and the command lines)."""
    dev = os.environ.get("DALLE_FAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    budget = os.environ.get("DALLE_FAST_BENCH_TIME_BUDGET")
    reps = os.environ.get("DALLE_FAST_BENCH_REPEATS")
    return {
        "device": torch.device(dev),
        "smoke": env_flag("DALLE_FAST_BENCH_SMOKE"),
        "quick": env_flag("DALLE_FAST_BENCH_QUICK"),
        "time_budget_s": float(budget) if budget else None,
        "repeats": int(reps) if reps else None,
        "out_dir": os.environ.get("DALLE_FAST_BENCH_OUT") or None,
    }


QUICK_GPU_REPEATS, QUICK_GPU_WARMUP = 20, 5


def quick_gpu(s: dict) -> bool:
    """Whether the settings ask for a quick timed GPU run (what --quick shortens where it shortens repeats)."""
    return s["quick"] and s["device"].type == "cuda" and not s["smoke"]


def family_suite(family: str, s: dict, *, repeats=None, warmup=None, notes=(), peers=DEFAULT_PEERS) -> Suite:
    """The Suite of one run of a family with the settings `s` (common_settings, or a family's own that extend
    them); repeats default to the settings' (DALLE_FAST_BENCH_REPEATS, --repeats)."""
    return Suite(family, s["device"], smoke=s["smoke"], quick=s["quick"], warmup=warmup,
                 repeats=s["repeats"] if repeats is None else repeats, out_dir=s["out_dir"],
                 time_budget_s=s["time_budget_s"], notes=list(notes), peers=peers)  # fmt: skip


def family_parser(description: str):
    """A family's command line: --device, --smoke, --quick, --repeats, --time-budget, --out."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat")
    p.add_argument("--quick", action="store_true", help="fewer cases / repeats (the family says which)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--time-budget", type=float, help="seconds; later cases are recorded as skipped")
    p.add_argument("--out", help="results folder (default benchmarks/results)")
    return p


def apply_args(settings: dict, args) -> dict:
    """Command-line values over the environment's."""
    for k, v in (("device", args.device and torch.device(args.device)), ("repeats", args.repeats),
                 ("time_budget_s", args.time_budget), ("out_dir", args.out)):  # fmt: skip
        if v:
            settings[k] = v
    settings["smoke"] = settings["smoke"] or args.smoke
    settings["quick"] = settings["quick"] or args.quick
    return settings


def run_family(new_suite, cases, run_case, case_id, goals) -> int:
    """Measure every case, write the results, print the summary. Exit status: 0 ok, 1 a backend failed,
    2 refused (interpreter), 3 interrupted (SIGINT/SIGTERM; what was measured is still written)."""
    try:
        suite = new_suite()
    except InterpreterRefused as e:
        print(f"refused: {e}")
        return 2
    interrupted = None
    try:
        with terminate_as_interrupt():
            for c in cases:
                for r in run_case(suite, c):
                    status = r["status"] if r["status"] != "ok" else f"{r['median_s'] * 1e3:.3f} ms"
                    print(f"{case_id(c):<60} {r['backend']:<14} {status}", flush=True)
    except KeyboardInterrupt as e:  # SIGTERM from `timeout` too: keep what was measured
        interrupted = f"interrupted ({e or 'SIGINT'}): the records stop there"
        suite.notes.append(interrupted)
    res = suite.finish(goals)
    print(res["text"])
    print(f"wrote {res['json']} and {res['summary']}")
    if interrupted:
        return 3
    return 1 if any(r["status"] == "error" for r in suite.records) else 0


def family_main(family, argv=None) -> int:
    """A family module's command line (`python -m benchmarks.<name>`): the settings from the environment and
    the arguments, every case of the family for the device, run_family's exit status."""
    s = apply_args(family.settings_from_env(), family_parser(family.__doc__.splitlines()[0]).parse_args(argv))
    todo = family.cases(s["device"], smoke=s["smoke"], quick=s["quick"])
    return run_family(lambda: family.new_suite(s), todo, family.run_case, family.case_id, family.goals)


def pytest_family(family, settings: dict, cases: list[dict]):
    """The module fixture `suite` and the test of a family's pytest wrapper (benchmarks/test_bench_<name>.py):
    one test per case (every backend of the device and the peers measured side by side); the fixture writes the
    JSON and summary when the module ends and prints the summary. A backend that raises fails its case's test;
    a missed performance goal fails nothing (it is printed as MISS)."""
    import pytest

    @pytest.fixture(scope="module")
    def suite(request):
        if interpreter_active():
            pytest.skip("TRITON_INTERPRET is set: runs under the Triton interpreter are never timed")
        if settings["device"].type == "cuda" and not torch.cuda.is_available():
            pytest.skip("DALLE_FAST_BENCH_DEVICE=cuda but no CUDA device is visible")
        s = family.new_suite(settings)
        yield s
        res = s.finish(family.goals)
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            print("\n" + res["text"] + f"wrote {res['json']} and {res['summary']}", flush=True)

    @pytest.mark.parametrize("case", cases, ids=[family.case_id(c) for c in cases])
    def test_case(suite, case):
        recs = family.run_case(suite, case)
        errors = [f"{r['backend']}: {r['reason']}" for r in recs if r["status"] == "error"]
        assert not errors, "; ".join(errors)
        assert any(r["status"] == "ok" for r in recs) or all(r.get("reason") == "time budget spent" for r in recs)

    return suite, test_case
