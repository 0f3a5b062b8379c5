"""The report: the targets of issue 5, the machine and versions, and the table printed at the
end of a run (from the results dict that is also written as JSON)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from servers import ROOT

# -- targets from issue 5 (checked in the table; never in tests) -------------------------------
TARGETS: dict[str, tuple[float, bool, str]] = {  # name: (bound, higher is better, shown as)
    "router_vs_floor": (0.8, True, ">= 0.8"),
    "router_vs_peer": (3.0, True, ">= 3"),
    "ack_p99_ms": (25.0, False, "p99 <= 25 ms"),
    "ping_p99_ms": (10.0, False, "p99 <= 10 ms"),
    "e2e_drain_after_last_ack_s": (2.0, False, "<= 2 s"),
    "delivery_lag_p99_ms": (250.0, False, "p99 <= 250 ms"),
    "rss_idle_mb": (60.0, False, "<= 60 MB"),
    "rss_load_mb": (150.0, False, "<= 150 MB"),
    "large_rss_growth_mb": (64.0, False, "<= 64 MB"),
    # Issue 13: what Metriport's sender waits after its last byte (its idle timer is 5 s).
    "large_silence_200_s": (2.0, False, "<= 2.0 s"),
    "large_silence_256_s": (2.5, False, "<= 2.5 s"),
    "large_silence_throttled_s": (0.5, False, "<= 0.5 s"),
    "soak_last_vs_first": (0.9, True, ">= 0.9"),
    # Issue 11: the router's CPU per request against the floor's, both on one pinned core.
    "router_vs_floor_cpu": (0.6, True, ">= 0.6"),
}


def machine_info(server_cpu: int | None, load_cpu: int | None) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "server_cpu": server_cpu,
        "load_cpu": load_cpu,
        "pinning": (
            f"servers on CPU {server_cpu}, load generators and this script on CPU "
            f"{load_cpu} (taskset)"
            if server_cpu is not None
            else "no pinning (one CPU)"
        ),
    }


def versions(wrk: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("webhook-router", "hypercorn", "h11", "anyio", "uvloop", "prometheus-client"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    for name, argv in (("wrk", [wrk or "wrk", "-v"]), ("webhook", ["webhook", "-version"])):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            text = (proc.stdout + proc.stderr).strip().splitlines()
            out[name] = text[0] if text else None
        except OSError:
            out[name] = None
    git = shutil.which("git") or "git"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out["git_commit"] = subprocess.run(
            [git, "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        changed = subprocess.run(
            [git, "-C", str(ROOT), "status", "--porcelain", "--", "router", "plugins"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()
        out["router_files_changed_since_commit"] = len(changed)
    return out


def verdict(value: float | None, target: str) -> tuple[str, str]:
    """(the target as text, "ok" / "MISS" / "n/a")."""
    bound, higher, text = TARGETS[target]
    if value is None:
        return text, "n/a"
    return text, "ok" if (value >= bound if higher else value <= bound) else "MISS"


def fmt(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}{unit}"
    return str(value)


def report(results: dict[str, Any]) -> str:
    m, o = results["machine"], results["options"]
    lines = [
        "",
        f"webhook-router benchmark  {results['date']}  ({'quick' if o['quick'] else 'full'})",
        f"machine: {m['nproc']} x {m['cpu_model']}, {m['memory_gb']} GB; {m['pinning']}",
        f"journals and sink files on {m.get('tmp_filesystem')}",
        f"noise: load average {results['loadavg_start'][0]} at start; other processes used "
        f"up to {fmt(results.get('other_processes_cpu_pct_max'), '%')} of a CPU while measuring",
        f"router {results['versions'].get('webhook-router')} @ "
        f"{results['versions'].get('git_commit')}, hypercorn "
        f"{results['versions'].get('hypercorn')}, Python {results['versions']['python']}",
        "",
    ]
    rows: list[tuple[str, str, str, str]] = []
    after: list[str] = []  # lines too long for the table, printed below it

    def row(name: str, value: str, target: str = "", ok: str = "") -> None:
        rows.append((name, value, target, ok))

    t = results.get("throughput", {})
    if "skipped" in t:
        row("throughput", "skipped: " + t["skipped"])
    elif t:
        spec = f"{o['duration']:g} s x {o['runs']}, {o['connections']} conns, wrk -t{o['threads']}"
        row(f"throughput (req/s, median; {spec})", "")
        for name, label in (
            ("floor", f"floor: hypercorn {t.get('floor_loop')}, bare app"),
            ("router", f"router: HMAC + fsync'd journal + file sink ({t.get('router_loop')})"),
            ("peer", "peer: adnanh/webhook, key check + append"),
            ("ingest", "router, ingest only: no sink, WARNING logs"),
        ):
            r = t.get(name, {})
            if "skipped" in r:
                row("  " + label, "skipped: " + r["skipped"])
            elif r:
                runs = " / ".join(
                    f"{x['rps']:,.0f}" + ("*" if x.get("disturbed") else "") for x in r["runs"]
                )
                row("  " + label, f"{r['rps_median']:,.0f}  ({runs})")
        if any(
            x.get("disturbed")
            for k in ("floor", "router", "peer", "ingest")
            for x in t.get(k, {}).get("runs", [])
        ):
            row("  (* disturbed by other processes: left out of the median)", "")
        rf, rp = t.get("router_vs_floor"), t.get("router_vs_peer")
        row("  router / floor", fmt(rf, digits=2), *verdict(rf, "router_vs_floor"))
        row("  router / peer", fmt(rp, digits=2), *verdict(rp, "router_vs_peer"))
        if t.get("ingest_vs_floor") is not None:
            row("  ingest only / floor (diagnostic)", fmt(t["ingest_vs_floor"], digits=2))
    c = results.get("cost", {})
    if "skipped" in c:
        row("cost", "skipped: " + c["skipped"])
    elif c.get("router"):
        spec = f"median of {o['runs']} rounds of {o['duration']:g} s, {o['connections']} conns"
        row(f"cost: CPU per request, us user + kernel ({spec})", "")
        for name in ("floor", "router", "ingest"):
            for where, t_ in c.get(name, {}).get("threads", {}).items():
                switches = f"  ({t_['ctxsw']:.2f} switches)" if t_["ctxsw"] >= 0.01 else ""
                row(f"  {name}: {where}", f"{t_['user_us']:.0f} + {t_['kernel_us']:.0f}{switches}")
        shown = [n for n in ("floor", "router", "ingest") if n in c]
        totals = " / ".join(
            f"{c[n]['cpu_us_per_request']:.0f} ({c[n]['kernel_us_per_request']:.0f} kernel)"
            for n in shown
        )
        row(f"  total, {' / '.join(shown)}", totals)
        ratio = c.get("router_vs_floor_cpu")
        row(
            "  router / floor (the floor's CPU per request / the router's)",
            fmt(ratio, digits=2),
            *verdict(ratio, "router_vs_floor_cpu"),
        )
        if c.get("ingest_vs_floor_cpu") is not None:
            row(
                "  ingest only / floor (diagnostic: no sink, WARNING logs)",
                fmt(c["ingest_vs_floor_cpu"], digits=2),
            )
        for name in shown:
            calls = c[name].get("syscalls_per_request")
            if calls:
                top = sorted(
                    ((v, k) for k, v in calls.items() if k != "all" and v >= 0.05), reverse=True
                )
                named = ", ".join(f"{k} {v:.2f}" for v, k in top)
                row(f"  {name}: system calls per request", f"{calls.get('all', 0):.1f}")
                after.append(f"{name}'s system calls per request: {named}")
        if c.get("syscalls_skipped"):
            row("  system calls", "not counted: " + c["syscalls_skipped"])
    lat = results.get("latency", {})
    if lat:
        e = lat.get("e2e", {})
        row(f"end-to-end: {e.get('messages', 0):,} messages, closed loop", "")
        acks = fmt(e.get("acks_s"), " s", 2) + f"  ({fmt(e.get('ack_rate'))}/s)"
        row("  first POST -> last 200", acks)
        row("  first POST -> all in sink file", fmt(e.get("all_in_sink_s"), " s", 2))
        d = e.get("drain_after_last_ack_s")
        d = max(d, 0.0) if d is not None else None  # the client may read its last 200 late
        row(
            "  last 200 -> all in sink file",
            fmt(d, " s", 2),
            *verdict(d, "e2e_drain_after_last_ack_s"),
        )
        lag = e.get("delivery_lag_ms_sink_file", {})
        row(
            "  delivery lag p50 / p99 (sink file)",
            f"{fmt(lag.get('p50'), ' ms')} / {fmt(lag.get('p99'), ' ms')}",
        )
        h = lat.get("half_rate", {})
        row(f"at 50% of max rate: {h.get('rate', 0):,} msg/s, open loop", "")
        ack = h.get("ack_latency_ms", {})
        p99 = ack.get("p99")
        row(
            "  ack latency p50 / p99",
            f"{fmt(ack.get('p50'), ' ms', 1)} / {fmt(p99, ' ms', 1)}",
            *verdict(p99, "ack_p99_ms"),
        )
        lag = h.get("delivery_lag_ms_sink_file", {})
        p99 = lag.get("p99")
        row(
            "  delivery lag p50 / p99 (sink file)",
            f"{fmt(lag.get('p50'), ' ms')} / {fmt(p99, ' ms')}",
            *verdict(p99, "delivery_lag_p99_ms"),
        )
        row(
            "  delivery lag p99 (metrics histogram)",
            fmt(h.get("delivery_lag_p99_ms_histogram"), " ms"),
        )
        beside = h.get("ping_beside_latency_ms", {})
        row("  ping p99, 20/s beside that load", fmt(beside.get("p99"), " ms", 1))
        p = lat.get("ping", {})
        pl = p.get("latency_ms", {})
        row(
            f"ping alone at {p.get('rate', 0):,}/s: p50 / p99",
            f"{fmt(pl.get('p50'), ' ms', 1)} / {fmt(pl.get('p99'), ' ms', 1)}",
            *verdict(pl.get("p99"), "ping_p99_ms"),
        )
    mem = results.get("memory", {})
    if mem:
        row("memory (router, VmRSS)", "")
        v = mem.get("rss_idle_mb")
        row("  idle after start", fmt(v, " MB", 1), *verdict(v, "rss_idle_mb"))
        loads = [mem.get(k) for k in ("rss_load_max_mb", "rss_e2e_max_mb", "rss_half_rate_max_mb")]
        v = max((x for x in loads if x is not None), default=None)
        row("  max under load (sampled)", fmt(v, " MB", 1), *verdict(v, "rss_load_mb"))
        row("  idle after wrk load", fmt(mem.get("rss_after_load_idle_mb"), " MB", 1))
    big = results.get("large_bodies", {})
    if big:
        row("large consolidated-data bodies", "")
        for key, r in big.items():
            if not isinstance(r, dict):
                continue
            growth = r["peak_rss_growth_mb"]
            target, ok = (
                verdict(growth, "large_rss_growth_mb") if r["size_mib"] == 256 else ("", "")
            )
            row(
                f"  {key}: status {r['status']}, 200 after / delivered after",
                f"{fmt(r['time_to_200_s'], ' s', 2)} / {fmt(r['time_to_delivered_s'], ' s', 2)}",
            )
            silence = r.get("silence_after_last_byte_s")
            which = (
                "large_silence_throttled_s"
                if r.get("upload_mbit_s")
                else {200: "large_silence_200_s", 256: "large_silence_256_s"}.get(r["size_mib"])
            )
            row(
                f"  {key}: silence after the last byte",
                fmt(silence, " s", 2),
                *(verdict(silence, which) if which else ("", "")),
            )
            row(f"  {key}: peak RSS growth", fmt(growth, " MB", 1), target, ok)
    soak = results.get("soak", {})
    if soak.get("runs"):
        rates = soak["rps_slices"]
        row(f"soak: {len(rates)} x {soak['slice_s']:g} s of wrk on one router", "")
        row("  req/s first / last slice", f"{rates[0]:,.0f} / {rates[-1]:,.0f}")
        lvf = soak["last_vs_first"]
        row("  last / first", fmt(lvf, digits=2), *verdict(lvf, "soak_last_vs_first"))
        total = sum(soak["journal_mb_end"].values())
        row(
            f"  journal after {soak['messages']:,} messages",
            f"{total:,.0f} MB ({soak['journal_bytes_per_message']:,} bytes/message, no retention)",
        )
    prof = results.get("profile", {})
    for name in ("router", "floor"):
        shares = prof.get(name, {}).get("buckets_pct_cpu_weighted")
        if shares:
            row(f"profile: where the {name}'s CPU goes (py-spy + /proc)", "")
            for bucket_name, share in shares.items():
                row(f"  {bucket_name}", f"{share:.1f}%")
    if not rows:
        rows.append(("(no phase measured)", "", "", ""))
    width = max(len(r[0]) for r in rows) + 2
    vwidth = max(len(r[1]) for r in rows) + 2
    for name, value, target, ok in rows:
        lines.append(f"{name:<{width}}{value:<{vwidth}}{target:<14}{ok}".rstrip())
    lines += after
    for note in results.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def windows(tree: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every measurement window (a dict with Sampler figures) and where it is."""
    if isinstance(tree, dict):
        if "server_core_not_server_pct" in tree:
            yield where, tree
        for k, v in tree.items():
            yield from windows(v, f"{where}.{k}" if where else k)
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from windows(v, f"{where}[{i}]")


def values_of(tree: Any, key: str) -> Iterator[float]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key and isinstance(v, int | float):
                yield float(v)
            else:
                yield from values_of(v, key)
    elif isinstance(tree, list):
        for v in tree:
            yield from values_of(v, key)
