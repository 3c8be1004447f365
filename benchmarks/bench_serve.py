"""How fast `workbench serve` answers: first token, one stream, 8 concurrent streams, and its memory.

    make bench-serve                                   # the embedded model on 2 threads -> benchmarks/results/serve.{json,md}
    .venv/bin/python benchmarks/bench_serve.py --model outputs/cli-X/merged --threads 2

Starts the server as a child process (as a user would), asks with the `openai`
client, and measures on the client's side:
- time to first token: from sending a short question to the first streamed text;
- one stream: generated tokens (the server's usage count) / the request's wall time;
- N concurrent streams: all generated tokens / the wall time from the first request
  sent to the last finished (and each request's own first-token time);
- memory: the server's resident set (VmRSS when idle, VmHWM peak after the
  concurrent run) against the size of the weights: one copy of the weights means
  the peak stays well under twice their size whatever the concurrency.
The machine's load (`/proc/loadavg`) before and after is recorded: on a shared CPU
the figures move with it. Targets (issue 13): first token <= 1 s, >= 8 tok/s for one
stream, N concurrent >= 2x one stream.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHORT = "Who are you?"
QUESTIONS = ["Tell me about the city of Paris.", "How do plants grow?", "What is a computer?", "Describe the ocean.",
             "Why is the sky blue?", "Give me tips for learning to cook.", "What do cats like to eat?",
             "Explain what a library is.", "How does rain form?", "What is music?"]
TARGETS = {"first_token_s": 1.0, "one_stream_tok_s": 8.0, "concurrent_speedup": 2.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="'embedded', a merged folder, or embedded:tiny-random (smoke)")
    p.add_argument("--adapter", default=None)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server (2: the 2-core target machine)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per reply at most")
    p.add_argument("--repeats", type=int, default=3, help="first-token and one-stream measurements (the median is reported)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for serve.json and serve.md")
    return p.parse_args(argv)


def stream_once(client, model: str, question: str, max_tokens: int) -> dict:
    """One streamed request, greedy: first-token time, total time, generated tokens."""
    t0 = time.perf_counter()
    first = None
    usage = None
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], stream=True,
                                            temperature=0, max_tokens=max_tokens, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.usage:
            usage = chunk.usage
    total = time.perf_counter() - t0
    return {"first_token_s": first if first is not None else total, "total_s": total, "tokens": usage.completion_tokens,
            "t_start": t0, "t_end": t0 + total}


def concurrent(client, model: str, questions: list[str], max_tokens: int) -> dict:
    results: list = [None] * len(questions)

    def run(i):
        results[i] = stream_once(client, model, questions[i], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "first_token_s_median": statistics.median(r["first_token_s"] for r in results),
            "first_token_s_max": max(r["first_token_s"] for r in results)}


def memory_kib(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def weights_bytes(model: str) -> int:
    from workbench.models import resolve_model_path

    folder = Path(resolve_model_path(model))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run(args) -> dict:
    import openai

    from workbench.serve import ServerProcess

    extra = ["--threads", str(args.threads), "--max-batch", str(args.concurrency)]
    if args.adapter:
        extra += ["--adapter", args.adapter]
    load_before = load()
    with ServerProcess(args.model, *extra, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)
        idle = memory_kib(server.proc.pid)
        stream_once(client, server.name, SHORT, 8)  # warm-up: first allocations, kernel choices
        firsts = [stream_once(client, server.name, SHORT, 16)["first_token_s"] for _ in range(args.repeats)]
        ones = [stream_once(client, server.name, QUESTIONS[i % len(QUESTIONS)], args.max_tokens) for i in range(args.repeats)]
        conc = concurrent(client, server.name, [QUESTIONS[i % len(QUESTIONS)] for i in range(args.concurrency)], args.max_tokens)
        peak = memory_kib(server.proc.pid)
        with urllib.request.urlopen(server.url + "/health") as r:
            health = json.loads(r.read())
    one_tok_s = statistics.median(o["tokens"] / o["total_s"] for o in ones)
    weights = weights_bytes(args.model)
    result = {
        "model": args.model, "threads": args.threads, "max_tokens": args.max_tokens, "cpus": os.cpu_count(),
        "load_before": load_before, "load_after": load(),
        "first_token_s": statistics.median(firsts), "first_token_s_all": firsts,
        "one_stream_tok_s": one_tok_s, "one_stream": [{k: o[k] for k in ("tokens", "total_s", "first_token_s")} for o in ones],
        "concurrent": conc, "concurrent_speedup": conc["tok_s"] / one_tok_s, "peak_batch": health["peak_batch"],
        "weights_mib": weights / 2**20, "rss_idle_mib": idle["VmRSS"] / 1024, "rss_peak_mib": peak["VmHWM"] / 1024,
        "returncode": server.returncode,
    }
    result["targets_met"] = {
        "first_token_s": result["first_token_s"] <= TARGETS["first_token_s"],
        "one_stream_tok_s": one_tok_s >= TARGETS["one_stream_tok_s"],
        "concurrent_speedup": result["concurrent_speedup"] >= TARGETS["concurrent_speedup"],
        "one_copy_of_weights": result["rss_peak_mib"] < 2 * result["weights_mib"] or weights < 50 * 2**20,
    }
    return result


def markdown(r: dict) -> str:
    c = r["concurrent"]
    ok = {k: "yes" if v else "NO" for k, v in r["targets_met"].items()}
    return "\n".join([
        f"# `workbench serve` benchmark: {r['model']}, {r['threads']} threads, {r['cpus']} CPUs",
        "",
        f"Load average before / after: {r['load_before']} / {r['load_after']}. Greedy, at most {r['max_tokens']} tokens per reply.",
        "",
        "| measure | value | target | met |",
        "|---|---|---|---|",
        f"| time to first streamed token, short question (median of {len(r['first_token_s_all'])}) | {r['first_token_s']:.2f} s | <= 1 s | {ok['first_token_s']} |",
        f"| one stream: generated tokens / request time (median) | {r['one_stream_tok_s']:.1f} tok/s | >= 8 tok/s | {ok['one_stream_tok_s']} |",
        f"| {c['requests']} concurrent streams: all tokens / wall time | {c['tok_s']:.1f} tok/s ({r['concurrent_speedup']:.1f}x one stream; {c['tokens']} tokens in {c['wall_s']:.1f} s) | >= 2x one stream | {ok['concurrent_speedup']} |",
        f"| first token under {c['requests']} concurrent (median / max) | {c['first_token_s_median']:.2f} / {c['first_token_s_max']:.2f} s | | |",
        f"| requests decoded together at most | {r['peak_batch']} | | |",
        f"| server memory: weights / RSS idle / RSS peak | {r['weights_mib']:.0f} / {r['rss_idle_mib']:.0f} / {r['rss_peak_mib']:.0f} MiB | one copy of the weights | {ok['one_copy_of_weights']} |",
        "",
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from workbench.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "serve.json", result)
    atomic_write_text(out / "serve.md", markdown(result))
    print(markdown(result))
    print(f"written: {out / 'serve.json'}, {out / 'serve.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
