"""The feedback loop, measured on a replay of a real dataset's test period (issue 24).

Every run below is a real ``bstrec serve`` process driven by ``bstrec.monitoring.replay``
(users arrive at the time of their next behaviour, ask for recommendations, "click" a shown
item they really interacted with within the window, and their behaviours are posted as events):

1. **A/B**: arm A serves the popularity-only bundle (the BST bundle's artifacts, ranked by
   training popularity over the whole catalogue), arm B the BST bundle, half the users each;
   the monitoring report of that log (``benchmarks/results/feedback/report.md`` and plots),
   and each arm's CTR with the bootstrap interval of the difference.
2. **Off-policy**: the popularity bundle served by the Plackett-Luce policy (propensities
   logged) to everyone, the BST bundle in shadow; IPS and SNIPS estimates of BST's CTR from that
   log alone, beside the BST arm's on-policy CTR of run 1.
3. **Faults**: short replays, one per fault (a feature frozen to a constant, a stale bundle, a
   retrieval source that returns nothing, the store down) and a healthy one; the live alerts on
   ``/metrics`` at the end of each.
4. **Logging overhead**: ``/recommend`` p99 with the impression log on and off, servers
   started in turn, rounds alternating, medians (``bench_serving.py``'s load generator).

All replays start from one store seeded with the history before the test period (copied per
run), with the same ``--limit`` test behaviours in time order.

    python benchmarks/bench_feedback.py --data-dir ../shared/data
    python benchmarks/bench_feedback.py --samples artifacts/select_rank/ml1m-ctr/samples \\
        --ranker artifacts/select_rank/ml1m-ctr/select/runs/bst_paper/seed0
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rank import DATASETS
from bench_serving import API_KEY, run_level, summarize
from bstrec.monitoring.faults import empty_source_bundle, stale_bundle
from bstrec.monitoring.impressions import read_log
from bstrec.monitoring.join import join_clicks
from bstrec.monitoring.replay import ReplayConfig, ReplayResult, load_replay_log, replay
from bstrec.serving.bundle import build_bundle, copy_bundle, read_reference
from common import ensure_samples, machine, now, update_section, write_result

RESULTS = Path(__file__).resolve().parent / "results"
REPORT_DIR = RESULTS / "feedback"
DAY_S = 86_400.0
# each fault and the alert that must see it (monitoring/alerts.py names)
PARTS = ("ab", "report", "ope", "faults", "overhead")
FAULT_ALERTS = {"frozen_feature": "feature_psi:last_category", "stale_bundle": "bundle_age",
                "empty_source": "empty_source:item_cf", "store_down": "degraded_share"}


# --- bundles ----------------------------------------------------------------------------------

def variant(src: Path, dst: Path, version: str, pipeline: dict[str, Any]) -> Path:
    """``src`` served as ``version`` with other pipeline settings (a fresh copy each run)."""
    shutil.rmtree(dst, ignore_errors=True)
    return copy_bundle(src, dst, version=version, pipeline=pipeline)


def popularity_pipeline(catalogue: int, policy: dict[str, Any]) -> dict[str, Any]:
    """Every catalogue item a candidate, ranked by training popularity: the stochastic policy
    then has support over any list the BST bundle could show (what IPS needs)."""
    return {"candidates": {"quotas": [["popular", catalogue]], "source_k": catalogue},
            "rank_n": catalogue, "ranking": "popular", "max_per_category": 0, "policy": policy}


def ensure_ranker(work: Path, samples: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    out = work / "bst"
    if not (out / "best").exists():
        from bstrec.training.task import train_ranker

        train_ranker("bst", samples, out, train_overrides={"max_epochs": 1})
    return out


# --- the service ------------------------------------------------------------------------------

@contextmanager
def serving(work: Path, name: str, port: int, env: dict[str, str]) -> Iterator[str]:
    """A ``bstrec serve`` process with ``env`` (BSTREC_* settings); stopped by SIGINT at the
    end, which flushes its impression log."""
    log_path = work / f"server-{name}.log"
    full = {**os.environ, "BSTREC_API_KEY": API_KEY, "BSTREC_PORT": str(port), **env}
    cmd = [str(Path(sys.executable).with_name("bstrec")), "serve"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=full, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the server was not ready in 300 s; see {log_path}")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def store_copy(seeded: Path, work: Path, name: str) -> str:
    dst = work / f"store-{name}.sqlite"
    for p in work.glob(f"store-{name}.sqlite*"):
        p.unlink()
    shutil.copy(seeded, dst)
    return str(dst)


def breached_alerts(url: str) -> dict[str, float]:
    """The live alerts on /metrics: name -> 1.0 breached / 0.0 not."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("bstrec_alert{"):
            name = line.split('name="', 1)[1].split('"', 1)[0]
            out[name] = max(out.get(name, 0.0), float(line.rsplit(" ", 1)[1]))
    return out


def run_replay(samples: Path, url: str, args: argparse.Namespace, limit: int,
               **config: Any) -> ReplayResult:
    cfg = ReplayConfig(k=args.k, window_s=args.window_s, limit=limit or None, seed_history=False,
                       api_key=API_KEY, **config)
    return replay(samples, url, cfg, progress=True)


# --- the runs -------------------------------------------------------------------------------

def seed_store(samples: Path, bundle: Path, work: Path, args: argparse.Namespace) -> Path:
    """A store holding every user's profile and history before the test period, and the
    items (``bstrec serve --seed-events SAMPLES --seed-until test``)."""
    path = work / "store-seeded.sqlite"
    if path.exists():
        return path
    tmp = work / "store-seeding.sqlite"
    for p in work.glob("store-seeding.sqlite*"):
        p.unlink()
    with serving(work, "seed", args.port, {"BSTREC_BUNDLE": str(bundle),
                                            "BSTREC_STORE_PATH": str(tmp),
                                            "BSTREC_SEED_EVENTS": str(samples),
                                            "BSTREC_SEED_UNTIL": "test"}):
        pass  # seeded at start
    tmp.rename(path)
    return path


def ab_run(samples: Path, bundles: dict[str, Path], seeded: Path, work: Path,
           args: argparse.Namespace) -> dict[str, Any]:
    from bstrec.monitoring.experiments import compare_arms

    log_dir = work / "log-ab"
    shutil.rmtree(log_dir, ignore_errors=True)
    env = {"BSTREC_BUNDLE": str(bundles["popular"]), "BSTREC_BUNDLE_B": str(bundles["bst"]),
           "BSTREC_SHARE_B": "0.5", "BSTREC_IMPRESSION_LOG": str(log_dir),
           "BSTREC_STORE_PATH": store_copy(seeded, work, "ab")}
    with serving(work, "ab", args.port, env) as url:
        result = run_replay(samples, url, args, args.limit)
    impressions, events = read_log(log_dir), read_log(log_dir, "events")
    ab = compare_arms(join_clicks(impressions, events, args.window_s), "A", "B",
                      n_boot=args.n_boot)
    return {"replay": result.to_dict(),
            "ab": {"bst_ctr": ab.ctr_b, "popular_ctr": ab.ctr_a, "diff": ab.diff, "lo": ab.lo,
                   "hi": ab.hi, "users_bst": ab.users_b, "users_popular": ab.users_a,
                   "impressions_bst": ab.impressions_b,
                   "impressions_popular": ab.impressions_a}}


def report_run(bundles: dict[str, Path], work: Path, args: argparse.Namespace
               ) -> dict[str, Any]:
    """The monitoring report of the A/B run's log, against both bundles' references."""
    from bstrec.monitoring.report import write_log_report

    references = {}
    for v in ("bst", "popular"):
        version, reference = read_reference(bundles[v])
        assert reference is not None
        references[version] = reference
    report = write_log_report(work / "log-ab", REPORT_DIR, window_s=args.window_s,
                              references=references, n_boot=args.n_boot, fmt="md")
    return {"report": str(report.report.relative_to(RESULTS.parent.parent)),
            "alerts": [dataclasses.asdict(a) for a in report.alerts]}


def ope_run(samples: Path, bundles: dict[str, Path], seeded: Path, work: Path,
            args: argparse.Namespace, on_policy_ctr: float) -> dict[str, Any]:
    from bstrec.monitoring.ope import estimate

    log_dir = work / "log-ope"
    shutil.rmtree(log_dir, ignore_errors=True)
    env = {"BSTREC_BUNDLE": str(bundles["popular-pl"]), "BSTREC_SHADOW_BUNDLE": str(bundles["bst"]),
           "BSTREC_IMPRESSION_LOG": str(log_dir),
           "BSTREC_STORE_PATH": store_copy(seeded, work, "ope")}
    with serving(work, "ope", args.port, env) as url:
        result = run_replay(samples, url, args, args.limit)
    impressions, events = read_log(log_dir), read_log(log_dir, "events")
    joined = join_clicks(impressions, events, args.window_s)
    shadow = impressions.filter(~impressions["shown"])
    # The on-policy CTR is the A/B run's arm B: its users only (half of them, by user hash),
    # whose CTR differs from the other half's by more than the estimate's own interval. The
    # estimate it is compared with covers the same users' requests (the replay's requests are
    # the same (user, time) pairs in every run: clicks are the users' real behaviours).
    arm_b = read_log(work / "log-ab").filter(pl.col("arm") == "B").select("user_id").unique()
    same = estimate(joined.join(arm_b, on="user_id", how="semi"),
                    shadow.join(arm_b, on="user_id", how="semi"), "bst", n_boot=args.n_boot)
    every = estimate(joined, shadow, "bst", n_boot=args.n_boot)
    out = {"replay": result.to_dict(), "logging_policy_ctr": result.ctr,
           "on_policy_ctr": on_policy_ctr, **dataclasses.asdict(same),
           "estimate": same.ips, "lo": same.ips_lo, "hi": same.ips_hi,
           "all_users": dataclasses.asdict(every)}
    out["covers"] = bool(same.ips_lo <= on_policy_ctr <= same.ips_hi)
    out["snips_covers"] = bool(same.snips_lo <= on_policy_ctr <= same.snips_hi)
    return out


def fault_runs(samples: Path, bundles: dict[str, Path], seeded: Path, work: Path,
               args: argparse.Namespace) -> dict[str, Any]:
    dataset, test_start = load_replay_log(samples)
    frozen = dataset.events["item_id"].mode().to_list()[0]  # the most common item, everywhere
    faulty = work / "faulty"
    shutil.rmtree(faulty, ignore_errors=True)
    stale = stale_bundle(bundles["bst"], faulty / "stale",
                         data_end=test_start - 2 * args.stale_days * DAY_S)
    empty = empty_source_bundle(bundles["bst"], faulty / "no-item-cf")
    base = {"BSTREC_ALERT_WINDOW": str(args.fault_limit * args.k)}
    runs: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
        "healthy": ({"BSTREC_BUNDLE": str(bundles["bst"])}, {}),
        "frozen_feature": ({"BSTREC_BUNDLE": str(bundles["bst"])}, {"freeze_item": frozen}),
        "stale_bundle": ({"BSTREC_BUNDLE": str(stale)}, {}),
        "empty_source": ({"BSTREC_BUNDLE": str(empty)}, {}),
    }
    out: dict[str, Any] = {"limit": args.fault_limit, "alerts": {}}
    for name, (env, cfg) in runs.items():
        env = {**base, **env, "BSTREC_STORE_PATH": store_copy(seeded, work, name)}
        with serving(work, name, args.port, env) as url:
            run_replay(samples, url, args, args.fault_limit, **cfg)
            out["alerts"][name] = breached_alerts(url)
    redis = shutil.which("redis-server")
    if redis is None:
        out["alerts"]["store_down"] = None  # said in the markdown: no redis-server here
    else:
        out["alerts"]["store_down"] = store_down_run(samples, bundles["bst"], work, args, base,
                                                     redis)
    alerts = out["alerts"]
    out["faults"] = {f: (None if alerts.get(f) is None else alerts[f].get(a) == 1.0)
                     for f, a in FAULT_ALERTS.items()}
    out["healthy_breaches"] = sum(1 for v in alerts["healthy"].values() if v == 1.0)
    return out


def store_down_run(samples: Path, bundle: Path, work: Path, args: argparse.Namespace,
                   base: dict[str, str], redis: str) -> dict[str, float]:
    """A Redis store stopped once the service is up: every request is served cold, degraded."""
    port = args.port + 1
    data = work / "redis"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    server = subprocess.Popen([redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(data)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        env = {**base, "BSTREC_BUNDLE": str(bundle), "BSTREC_STORE": "redis",
               "BSTREC_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
        with serving(work, "store_down", args.port, env) as url:
            server.terminate()
            server.wait(30)
            cfg = ReplayConfig(k=args.k, window_s=args.window_s, limit=args.fault_limit,
                               seed_history=False, api_key=API_KEY,
                               max_errors=args.fault_limit + 1)  # event writes fail: expected
            replay(samples, url, cfg, progress=True)
            return breached_alerts(url)
    finally:
        if server.poll() is None:
            server.kill()


def overhead_run(samples: Path, bundle: Path, seeded: Path, work: Path,
                 args: argparse.Namespace) -> dict[str, Any]:
    """/recommend p99 with the impression log on and off: a server per run, on and off
    alternating (which goes first alternates by round too), so that both see the same drift of
    the machine's load."""
    dataset, _ = load_replay_log(samples)
    users = dataset.users["user_id"].to_list()
    items = dataset.items["item_id"].to_list()
    p99: dict[str, list[float]] = {"on": [], "off": []}
    rounds: list[dict[str, Any]] = []
    for r in range(args.overhead_rounds):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            log_dir = work / f"log-overhead-{r}"
            shutil.rmtree(log_dir, ignore_errors=True)
            env = {"BSTREC_BUNDLE": str(bundle),
                   "BSTREC_STORE_PATH": store_copy(seeded, work, "overhead")}
            if mode == "on":
                env["BSTREC_IMPRESSION_LOG"] = str(log_dir)
            with serving(work, f"overhead-{mode}", args.port, env) as url:
                level = asyncio.run(run_level(url, args.clients, args.overhead_s, 5.0, users,
                                              items, 0.1, seed=r))
            s = summarize(level)
            p99[mode].append(s["p99_ms"])
            rounds.append({"round": r, "mode": mode, "p50_ms": s["p50_ms"],
                           "p99_ms": s["p99_ms"], "requests": s["recommend_requests"],
                           "errors": s["errors"]})
    on, off = statistics.median(p99["on"]), statistics.median(p99["off"])
    ratios = [a / b for a, b in zip(p99["on"], p99["off"], strict=True)]
    return {"p99_on_ms": on, "p99_off_ms": off, "ratio_of_medians": on / off,
            "ratio_median_of_rounds": statistics.median(ratios), "rounds": rounds,
            "clients": args.clients, "seconds_per_round": args.overhead_s}


# --- report -----------------------------------------------------------------------------------

def fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(r: dict[str, Any]) -> str:
    m, ab, ope, f = r["machine"], r["ab_run"]["ab"], r["ope"], r["fault_runs"]
    rep = r["ab_run"]["replay"]
    lines = [
        "## Feedback loop: replay, A/B, off-policy estimate, alerts, logging overhead "
        f"({r['protocol']})", "",
        f"`{r['command']}` on {r['date']}, {m['cores']} cores ({m['cpu']}); the runs not "
        "named by `--parts` are the workdir's last ones (`part-*.json`, same samples and "
        "ranker). Replay of the "
        + (f"first {r['limit']} test behaviours" if r["limit"]
           else f"whole test period ({rep['requests']} behaviours)")
        + f" in time order (k = {r['k']}, click window "
        f"{r['window_s'] / DAY_S:g} days), each run from the same store seeded with the history "
        "before the test period.", "",
        f"- **Replay (A/B run)**: {rep['requests']} requests, {rep['clicks']} clicks "
        f"({rep['shown']} items shown). Monitoring report: [{r['report']['report']}]"
        f"({r['report']['report'].removeprefix('benchmarks/')}); its breached alerts: "
        + (", ".join(f"`{a['name']}` of {a['model_version'] or 'all'} ({a['value']:.3g} > "
                     f"{a['threshold']:g})" for a in r["report"]["alerts"] if a["breached"])
           or "none") + ".",
        f"- **A/B** (half the users each, bootstrap over users, {r['n_boot']} resamples): BST "
        f"CTR {fmt(ab['bst_ctr'])} against popularity {fmt(ab['popular_ctr'])}; difference "
        f"{fmt(ab['diff'])} [{fmt(ab['lo'])}, {fmt(ab['hi'])}].",
        f"- **Off-policy**: from the log of the popularity bundle served by Plackett-Luce "
        f"(temperature {r['temperature']:g}; its own CTR {fmt(ope['logging_policy_ctr'])}), "
        f"IPS estimate of the BST bundle's CTR over the BST arm's {ope['n_users']} users "
        f"{fmt(ope['estimate'])} [{fmt(ope['lo'])}, {fmt(ope['hi'])}], SNIPS "
        f"{fmt(ope.get('snips'))} [{fmt(ope.get('snips_lo'))}, {fmt(ope.get('snips_hi'))}]; "
        f"that arm's on-policy CTR {fmt(ope['on_policy_ctr'])}: "
        f"{'inside' if ope['covers'] else 'OUTSIDE'} the IPS interval, "
        f"{'inside' if ope['snips_covers'] else 'OUTSIDE'} the SNIPS one"
        + (f". Over all {a['n_users']} users: IPS {fmt(a['ips'])} [{fmt(a['ips_lo'])}, "
           f"{fmt(a['ips_hi'])}]." if (a := ope.get("all_users")) else "."),
        f"- **Faults** ({f['limit']} test behaviours each; live alerts on /metrics at the end):",
        "",
        "| fault | alert | breached |",
        "|---|---|---|",
    ]
    for fault, alert in FAULT_ALERTS.items():
        hit = f["faults"][fault]
        lines.append(f"| {fault} | `{alert}` | {'n/a (no redis-server)' if hit is None else hit} |")
    healthy = sorted(k for k, v in f["alerts"]["healthy"].items() if v == 1.0)
    lines += ["", f"  Healthy replay: {f['healthy_breaches']} alerts breached"
              + (f" ({', '.join(healthy)})" if healthy else "") + "."]
    if "overhead" in r:
        o = r["overhead"]
        p99 = {m: [x["p99_ms"] for x in o["rounds"] if x["mode"] == m] for m in ("on", "off")}
        ratios = [a / b for a, b in zip(p99["on"], p99["off"], strict=True)]
        lines.append(
            f"- **Logging overhead** on `/recommend` ({o['clients']} clients, "
            f"{len(o['rounds']) // 2} rounds of {o['seconds_per_round']:g} s per mode, "
            f"alternating): p99 {o['p99_on_ms']:.2f} ms with the impression log against "
            f"{o['p99_off_ms']:.2f} ms without, ratio of medians "
            f"**{o['ratio_of_medians']:.3f}** (median of per-round ratios "
            f"{o['ratio_median_of_rounds']:.3f}; per round from {min(ratios):.2f} to "
            f"{max(ratios):.2f}); goal under 1.10: "
            f"**{'met' if o['ratio_of_medians'] < 1.10 else 'not met'}**; failed requests "
            f"{sum(x['errors'] for x in o['rounds'])}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", default="ml1m-ctr", choices=list(DATASETS))
    ap.add_argument("--samples", help="samples folder (default: built under the workdir)")
    ap.add_argument("--ranker", help="BST training run (default: one epoch trained here)")
    ap.add_argument("--limit", type=int, default=20_000,
                    help="test behaviours replayed (0: the whole test period)")
    ap.add_argument("--fault-limit", type=int, default=3_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--window-s", type=float, default=7 * DAY_S)
    ap.add_argument("--stale-days", type=float, default=30.0,
                    help="the alert's default bundle age (stale bundle: twice older)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--n-boot", type=int, default=1000)
    # one round's p99 moves with the shared machine's load (the markdown prints the range of
    # the per-round ratios): medians over many rounds
    ap.add_argument("--overhead-rounds", type=int, default=10)
    ap.add_argument("--overhead-s", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                    help="runs to do now; the others' last results (in the workdir) are reused")
    ap.add_argument("--port", type=int, default=8771)
    ap.add_argument("--workdir", default="artifacts/bench_feedback")
    ap.add_argument("--data-dir", default=os.environ.get("BSTREC_DATA_DIR", "../shared/data"))
    ap.add_argument("--markdown-only", action="store_true")
    args = ap.parse_args()
    if args.markdown_only:
        update_section("feedback", markdown(json.loads((RESULTS / "feedback.json").read_text())))
        return

    work = Path(args.workdir) / args.protocol
    work.mkdir(parents=True, exist_ok=True)
    samples = (Path(args.samples) if args.samples
               else ensure_samples(DATASETS[args.protocol], work / "samples", args.data_dir))
    ranker = ensure_ranker(work, samples, args.ranker)

    bst = work / "bundles" / "bst"
    if not (bst / "manifest.json").exists():
        build_bundle(samples, ranker, bst, version="bst")
    catalogue = len(load_replay_log(samples)[0].items)
    bundles = {"bst": bst,
               "popular": variant(bst, work / "bundles" / "popular", "popular",
                                  popularity_pipeline(catalogue, {"kind": "greedy"})),
               "popular-pl": variant(bst, work / "bundles" / "popular-pl", "popular-pl",
                                     popularity_pipeline(catalogue, {
                                         "kind": "plackett_luce",
                                         "temperature": args.temperature}))}
    started = time.time()
    seeded = seed_store(samples, bst, work, args)
    result: dict[str, Any] = {
        "protocol": args.protocol, "date": now(), "machine": machine(),
        "command": "python benchmarks/bench_feedback.py " + " ".join(sys.argv[1:]),
        "limit": args.limit, "k": args.k, "window_s": args.window_s, "n_boot": args.n_boot,
        "temperature": args.temperature}

    def part(name: str, run: Any) -> Any:
        """A run's result: done now when asked for, else the workdir's last one (None)."""
        path = work / f"part-{name}.json"
        if name in args.parts:
            path.write_text(json.dumps(run(), indent=2, default=float))
        return json.loads(path.read_text()) if path.exists() else None

    result["ab_run"] = part("ab", lambda: ab_run(samples, bundles, seeded, work, args))
    result["report"] = part("report", lambda: report_run(bundles, work, args))
    result["ope"] = part("ope", lambda: ope_run(samples, bundles, seeded, work, args,
                                                 result["ab_run"]["ab"]["bst_ctr"]))
    result["fault_runs"] = part("faults", lambda: fault_runs(samples, bundles, seeded, work, args))
    result["overhead"] = part("overhead", lambda: overhead_run(samples, bst, seeded, work, args))
    missing = [k for k in ("ab_run", "report", "ope", "fault_runs", "overhead")
               if result[k] is None]
    if missing:
        print(json.dumps(result, indent=2, default=float))
        raise SystemExit(f"not written: no results yet for {missing} (run them with --parts)")
    # the issue's summary keys
    rep = result["ab_run"]["replay"]
    result["replay"] = {"requests": rep["requests"], "clicks": rep["clicks"]}
    result["ab"] = result["ab_run"]["ab"]
    result["logging_p99_ratio"] = result["overhead"]["ratio_of_medians"]
    result["faults"] = result["fault_runs"]["faults"]
    result["healthy_breaches"] = result["fault_runs"]["healthy_breaches"]
    result["seconds"] = round(time.time() - started, 1)
    write_result("feedback", result)
    update_section("feedback", markdown(result))


if __name__ == "__main__":
    main()
