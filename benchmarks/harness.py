"""The benchmarks' harness: how methods are timed side by side, summarized, printed and recorded.

Timing (:func:`side_by_side`, :func:`summary`), tables (:func:`rows`,
:func:`target_line`), the machine (:func:`machine`), the JSON results
(:func:`write_json`), fresh processes (:func:`in_fresh_process`), the page cache
(:func:`settle`, :func:`drop_page_cache`) and memory sampling (:class:`PeakSampler`).

Run as a script, it is the other end of :func:`in_fresh_process`::

    python benchmarks/harness.py --call bench_load:child --kwargs '{"method": ..., "run": ...}'

calls ``bench_load.child(**kwargs)`` and prints what it returns as JSON, on the last line.
"""
import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(HERE), HERE):  # the library (when not installed) and the section modules
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

MiB = 1024 * 1024


# --- timing ----------------------------------------------------------------------------------


def shuffled(names, rep, seed):
    """The order in which repetition ``rep`` (-1: the warm-up) runs ``names``.

    A permutation drawn by ``random.Random`` seeded by ``seed`` and ``rep``: the same
    seed gives the same orders, so that a run can be repeated exactly.
    """
    order = list(names)
    random.Random(f"{seed}/{rep}").shuffle(order)
    return order


def side_by_side(methods, reps, *, seed, setup=None, warmup=True):
    """Time each method ``reps`` times, every method once per repetition, in a shuffled order.

    Every repetition runs the methods in an order of its own (:func:`shuffled`), so
    that no method always follows the same one (a method that leaves work for the
    machine, dirty pages for instance, would otherwise always slow down the same
    next one) nor always comes first. With ``warmup``, a first round (in an order of
    its own too) is run and not counted.

    :param methods: ``{name: fn}``; ``fn()`` is timed (``setup(name)`` before it is not).
    :param seed: the seed of the orders (the ``--seed`` option).
    :return: ``{name: [seconds, ...]}``, in the order of the repetitions.
    """
    times = {name: [] for name in methods}
    for rep in range(-1 if warmup else 0, reps):
        for name in shuffled(methods, rep, seed):
            if setup is not None:
                setup(name)
            started = time.perf_counter()
            methods[name]()
            elapsed = time.perf_counter() - started
            if rep >= 0:
                times[name].append(elapsed)
    return times


def summary(samples):
    """Median, min, max and count of ``samples`` (seconds), with the samples."""
    samples = list(samples)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples),
            "samples": samples}


def summaries(times):
    """:func:`summary` of each method of :func:`side_by_side`'s result."""
    return {name: summary(t) for name, t in times.items()}


# --- tables ------------------------------------------------------------------------------------


def rows(title, results, baseline, *, nbytes=None, ratio="time", scale=1.0):
    """Print a table of ``results`` (``{name: summary}``) with ratios to ``baseline``.

    :param ratio: ``"time"`` (time / the baseline's) or ``"throughput"`` (the inverse).
    :param scale: multiplies the times printed (e.g. ``1e6`` for microseconds).
    """
    print(f"\n{title}")
    header = f"  {'method':58s} {'median':>9s} {'min':>9s} {'max':>9s}"
    header += f" {'GB/s':>7s}" if nbytes else ""
    header += f" {'vs ' + baseline if baseline else '':>18s}"
    print(header)
    base = results[baseline]["median"] if baseline else None
    for name, s in results.items():
        line = f"  {name:58s} {s['median'] * scale:9.4f} {s['min'] * scale:9.4f} {s['max'] * scale:9.4f}"
        if nbytes:
            line += f" {nbytes / s['median'] / 1e9:7.2f}"
        if base:
            value = base / s["median"] if ratio == "throughput" else s["median"] / base
            line += f" {value:17.3f}x"
        print(line)


def target_line(text, value, target, better="higher", minima=None):
    """Print one line of the summary: a ratio, its target and whether it is met."""
    met = value >= target if better == "higher" else value <= target
    extra = f", of minima {minima:.3f}" if minima is not None else ""
    print(f"  {text:68s} {value:7.3f}  (target {'>=' if better == 'higher' else '<='} {target}: "
          f"{'met' if met else 'MISSED'}{extra})")


# --- the machine and the results ------------------------------------------------------------------


def machine(directory):
    """Python, torch, CPUs, memory, and the disk that holds ``directory``."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 1024 ** 2, 1)
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    with contextlib.suppress(OSError, ValueError):
        target = os.path.realpath(directory)
        best = ("", "", "")
        with open("/proc/mounts") as f:
            for line in f:
                device, mount, fstype = line.split()[:3]
                if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best[1]):
                    best = (device, mount, fstype)
        info["disk"] = {"device": best[0], "mount": best[1], "filesystem": best[2]}
        name = os.path.basename(best[0])
        with contextlib.suppress(OSError):
            with open(f"/sys/block/{name}/queue/rotational") as f:
                info["disk"]["rotational"] = f.read().strip() == "1"
    info["cuda"] = torch.cuda.is_available()
    return info


def describe_machine(info, directory):
    """One line about the machine of :func:`machine`."""
    disk = info.get("disk", {})
    return (f"machine: {info.get('cpus')} CPUs ({info.get('cpu', '?')}), {info.get('memory_gib', '?')} GiB, "
            f"torch {info['torch']}, CUDA {'yes' if info['cuda'] else 'no'}; files in {directory} on "
            f"{disk.get('device', '?')} ({disk.get('filesystem', '?')})")


def write_json(report, path):
    """Write ``report`` to ``path`` as JSON (creating its directory); return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    return path


# --- fresh processes -------------------------------------------------------------------------------


def in_fresh_process(module, function, **kwargs):
    """Call ``module.function(**kwargs)`` in a new Python process; return what it returned.

    ``module`` is one of the benchmark modules; the arguments and the result travel as JSON.
    """
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--call", f"{module}:{function}",
                          "--kwargs", json.dumps(kwargs)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{module}.{function}({kwargs}) failed in its own process:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child_main(argv=None):
    parser = argparse.ArgumentParser(description="the child end of in_fresh_process()")
    parser.add_argument("--call", required=True, help="module:function")
    parser.add_argument("--kwargs", default="{}", help="the keyword arguments, as JSON")
    args = parser.parse_args(argv)
    module, function = args.call.split(":")
    import importlib
    result = getattr(importlib.import_module(module), function)(**json.loads(args.kwargs))
    print(json.dumps(result))
    return 0


# --- the page cache --------------------------------------------------------------------------------


def settle():
    """Flush dirty pages, so that one measurement does not pay for the previous one's writeback."""
    os.sync()


def remove(*paths):
    """Remove files; those already missing are fine."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def drop_page_cache(paths):
    """Evict ``paths`` from the page cache; return how (``None`` when it could not).

    ``posix_fadvise(DONTNEED)`` on each file (it drops clean pages, which fsynced
    checkpoint files are, and leaves the rest of the machine's cache alone); where
    that is not available, ``/proc/sys/vm/drop_caches`` if writable.
    """
    os.sync()
    if hasattr(os, "posix_fadvise"):
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise(DONTNEED)"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        return None


def steady_allocator():
    """Put the C allocator in the state of a process that has run for a while.

    glibc serves large blocks with fresh memory maps until a freed block raises its
    threshold (up to 32 MiB); afterwards blocks up to that size come from memory the
    process already holds. Depending on which section runs first, the same load
    would otherwise run with fresh pages (page faults on every byte) or not. Here
    the threshold is raised once, at the start; fresh-process figures are measured
    separately (sections load and memory).
    """
    block = torch.empty(32 * MiB, dtype=torch.uint8)
    del block


# --- memory ---------------------------------------------------------------------------------------


def _statm():
    """This process's resident memory and its anonymous part (resident - file-backed), in bytes."""
    with open("/proc/self/statm") as f:
        _size, resident, shared = (int(x) for x in f.read().split()[:3])
    page = os.sysconf("SC_PAGE_SIZE")
    return resident * page, (resident - shared) * page


class PeakSampler:
    """Samples the process's RSS (total, and anonymous = resident - file-backed) in a thread.

    ``with PeakSampler() as peak: ...``; then ``peak.before_total``,
    ``peak.before_anon``, ``peak.peak_total`` and ``peak.peak_anon`` (bytes).
    """

    def __init__(self, interval=0.0005):
        self.interval, self.peak_total, self.peak_anon = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            total, anon = _statm()
            self.peak_total, self.peak_anon = max(self.peak_total, total), max(self.peak_anon, anon)
            time.sleep(self.interval)

    def __enter__(self):
        self.before_total, self.before_anon = _statm()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        total, anon = _statm()
        self.peak_total, self.peak_anon = max(self.peak_total, total), max(self.peak_anon, anon)

    def as_dict(self):
        return {"before_total": self.before_total, "before_anon": self.before_anon,
                "peak_total": self.peak_total, "peak_anon": self.peak_anon}


if __name__ == "__main__":
    sys.exit(_child_main())
