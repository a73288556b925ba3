"""proxy_overhead.py's report: per-variant medians of per-round ratios against the bare proxy
on the same loop, the Redis round trips, the chat run, what wins, and the issue's goals."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from loadgen import pct
from variants import Bench, Variant


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to width; the first left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def summarise(v: Variant, base: Variant, script_cmds: set[str]) -> dict[str, Any]:
    """Medians over rounds of per-round ratios; latency percentiles over all open-loop slices."""
    closed = list(zip(v.results["closed"], base.results["closed"], strict=True))
    opened, base_opened = v.results["open"], base.results["open"]
    lat = [x for s in opened for x in s.latencies]
    base_lat = [x for s in base_opened for x in s.latencies]
    cpu_open = sum(s.cpu_s for s in opened) / sum(s.requests + s.errors for s in opened) * 1e6
    base_cpu_open = sum(s.cpu_s for s in base_opened) / sum(s.requests + s.errors for s in base_opened) * 1e6
    row: dict[str, Any] = {
        "rps": med([s.rps for s, _ in closed]),
        "ratio": med([s.rps / b.rps for s, b in closed]),
        "p50": pct(lat, 0.5),
        "p99": pct(lat, 0.99),
        "add50": pct(lat, 0.5) - pct(base_lat, 0.5),
        "add99": pct(lat, 0.99) - pct(base_lat, 0.99),
        "cpu": med([s.cpu_us for s, _ in closed]),
        "cpu_ratio": med([s.cpu_us / b.cpu_us for s, b in closed]),
        "cpu_open": cpu_open,
        "cpu_open_ratio": cpu_open / base_cpu_open,
        "redis_cpu": sum(s.redis_cpu_s for s, _ in closed) / sum(s.requests for s, _ in closed) * 1e6,
        "errors": sum(s.errors for ss in v.results.values() for s in ss),
        "samples": len(lat),
        "max_lag_ms": max(s.max_lag_ms for s in opened),
        "open_rate": sum(s.requests + s.errors for s in opened) / sum(s.seconds for s in opened),
    }
    if v.kind == "gateway":
        sent = {k: n for k, n in v.commands.items() if k not in script_cmds and n}
        row["admitted"] = v.admitted
        row["acquire_per_admission"] = v.verbs["acquire"] / max(1, v.admitted)
        row["commands_per_admission"] = sum(sent.values()) / max(1, v.admitted)
        row["commands_sent"] = dict(sent)
        row["store_calls"] = dict(v.verbs)
        row["background_calls"] = dict(v.background)
        row["evalsha"] = v.commands["evalsha"] + v.commands["eval"]
        row["evalsha_store_counted"] = sum(v.verbs.values()) + sum(v.background.values())
    return row


def report(args: argparse.Namespace, bench: Bench, codecs: list[dict[str, Any]], elapsed: float) -> None:
    summary = {
        v.name: summarise(v, bench.by_name(v.baseline) if v.baseline else v, bench.script_cmds)
        for v in bench.variants
    }
    rows = []
    for v in bench.variants:
        r = summary[v.name]
        cells = [v.name, f"{r['rps']:.0f}", f"{r['ratio']:.2f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}"]
        cells += [f"{r['add50']:+.2f}", f"{r['add99']:+.2f}"] if v.baseline else ["", ""]
        cells += [
            f"{r['cpu']:.0f}",
            f"{r['cpu_ratio']:.2f}",
            f"{r['cpu_open']:.0f}",
            f"{r['cpu_open_ratio']:.2f}",
        ]
        if v.kind == "gateway":
            cells += [f"{r['redis_cpu']:.0f}", f"{r['acquire_per_admission']:.3f}"]
            cells += [f"{r['commands_per_admission']:.3f}"]
        else:
            cells += ["", "", ""]
        rows.append(cells)
    headers = ["variant", "req/s", "ratio", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms", "CPU us/req", "ratio"]
    headers += [f"CPU us/req @{args.rate:g}/s", "ratio", "Redis CPU us/req", "acquire/adm", "Redis cmds/adm"]
    slices = len(bench.variants[0].results["closed"])
    print()
    print(
        f"## Proxy overhead: {slices} interleaved rounds of {args.slice:g} s per variant and load; "
        "ratios vs the bare proxy on the same loop, in the same round (median)"
    )
    print(fmt_table(headers, rows))
    print(
        f"  req/s, CPU us/req: closed loop, C={args.concurrency} (median over rounds); p50/p99, CPU us/req "
        f"@{args.rate:g}/s: open loop at {args.rate:g} req/s (all rounds pooled).\n"
        "  CPU: the proxy process's utime+stime per request; Redis CPU: redis-server's, per request.\n"
        "  acquire/adm: the store's acquire calls per admitted request; Redis cmds/adm: every command\n"
        "  Redis received from clients per admitted request (all gateways' per-instance background included)."
    )

    print("\n## Redis round trips (INFO commandstats of the private Redis over every gateway slice)")
    for v in bench.variants:
        if v.kind != "gateway":
            continue
        r = summary[v.name]

        def fmt(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {n}" for k, n in sorted(d.items())) or "none"

        print(
            f"  {v.name}: admitted {r['admitted']}; Redis received {fmt(r['commands_sent'])}; "
            f"its store sent {fmt(r['store_calls'])}; the idle gateways sent {fmt(r['background_calls'])}; "
            f"EVALSHA received {r['evalsha']} = store-counted {r['evalsha_store_counted']}"
        )

    bare, gw = bench.by_name("bare uvloop"), bench.by_name("gateway uvloop pipelined")
    if "chat" in gw.results:
        pairs = list(zip(gw.results["chat"], bare.results["chat"], strict=True))
        summary["chat"] = {
            "bare_rps": med([b.rps for _, b in pairs]),
            "gateway_rps": med([g.rps for g, _ in pairs]),
            "ratio": med([g.rps / b.rps for g, b in pairs]),
            "bare_cpu": med([b.cpu_us for _, b in pairs]),
            "gateway_cpu": med([g.cpu_us for g, _ in pairs]),
            "cpu_ratio": med([g.cpu_us / b.cpu_us for g, b in pairs]),
        }
        c = summary["chat"]
        print("\n## POST /v1/chat/completions, 2 KB body (closed loop, uvloop; model + account limits)")
        print(
            f"  bare {c['bare_rps']:.0f} req/s, {c['bare_cpu']:.0f} us/req; gateway {c['gateway_rps']:.0f} "
            f"req/s, {c['gateway_cpu']:.0f} us/req; throughput ratio {c['ratio']:.2f}, CPU ratio "
            f"{c['cpu_ratio']:.2f}"
        )

    main_row = summary[gw.name]
    asy = summary["gateway asyncio pipelined"]
    py = summary["gateway uvloop redis-py"]
    bare_as = summary["bare asyncio"]
    print("\n## Keep what wins (CPU per request: closed loop / at 200 req/s)")
    print(
        f"  event loop, gateway: uvloop {main_row['cpu']:.0f} / {main_row['cpu_open']:.0f} us, asyncio "
        f"{asy['cpu']:.0f} / {asy['cpu_open']:.0f} us (uvloop/asyncio {main_row['cpu'] / asy['cpu']:.2f} / "
        f"{main_row['cpu_open'] / asy['cpu_open']:.2f}); req/s {main_row['rps']:.0f} vs {asy['rps']:.0f}"
    )
    bu = summary["bare uvloop"]
    print(
        f"  event loop, bare proxy: uvloop {bu['cpu']:.0f} / {bu['cpu_open']:.0f} us, asyncio "
        f"{bare_as['cpu']:.0f} / {bare_as['cpu_open']:.0f} us; req/s {bu['rps']:.0f} vs {bare_as['rps']:.0f}"
    )
    print(
        f"  Redis client (uvloop): pipelined {main_row['cpu']:.0f} / {main_row['cpu_open']:.0f} us, "
        f"redis-py+hiredis {py['cpu']:.0f} / {py['cpu_open']:.0f} us "
        f"(pipelined/redis-py {main_row['cpu'] / py['cpu']:.2f} / "
        f"{main_row['cpu_open'] / py['cpu_open']:.2f}); req/s {main_row['rps']:.0f} vs {py['rps']:.0f}"
    )
    for c in codecs:
        saving = c["json_us"] - c["orjson_us"]
        print(
            f"  JSON, {c['body']} chat body ({c['bytes']} B): json.loads {c['json_us']:.1f} us, orjson.loads "
            f"{c['orjson_us']:.1f} us (x{c['json_us'] / c['orjson_us']:.1f} faster): saves {saving:.1f} us "
            f"per chat request, {saving / main_row['cpu'] * 100:.1f}% of the {main_row['cpu']:.0f} us of CPU "
            "the gateway spends on a small request"
        )

    print("\n## Goals (gateway uvloop pipelined vs bare uvloop)")
    rt_ok = all(
        summary[v.name]["acquire_per_admission"] == 1.0 and summary[v.name]["admitted"] > 0
        for v in bench.variants
        if v.kind == "gateway"
    )
    goals = [
        ("throughput ratio >= 0.8", main_row["ratio"] >= 0.8, f"{main_row['ratio']:.2f}"),
        (
            f"added p99 <= 1 ms at {args.rate:g} req/s",
            main_row["add99"] <= 1.0,
            f"{main_row['add99']:+.2f} ms",
        ),
        (
            "exactly 1 Redis round trip per admission that does not wait",
            rt_ok,
            f"{main_row['acquire_per_admission']:.3f} acquire per admission "
            f"({main_row['commands_per_admission']:.4f} counting per-instance background)",
        ),
    ]
    for text, ok, value in goals:
        print(f"  [{'met' if ok else 'NOT MET'}] {text}: {value}")
    errors = sum(summary[v.name]["errors"] for v in bench.variants)
    print(
        f"\n(open loop: {main_row['open_rate']:.1f} req/s achieved, latest start "
        f"{max(summary[v.name]['max_lag_ms'] for v in bench.variants):.1f} ms behind schedule; "
        f"{errors} non-200 answers; total run time {elapsed:.0f} s)"
    )
    if args.cprofile:
        print(
            f"('gateway uvloop pipelined' ran under cProfile, so its figures are inflated: {args.cprofile})"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "summary": summary, "codecs": codecs}, indent=2)
        )
