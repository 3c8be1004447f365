"""Ask a running `workbench serve` one question with the official openai client, streamed; print the answer.

    python scripts/ask_openai.py http://127.0.0.1:8000/v1 "Who are you?" [--timeout 300]

Waits (up to --timeout seconds) until the server answers /health, then asks the
model that /v1/models lists. Used at the end of `make run-cli`.
"""
import argparse
import sys
import time
import urllib.request

import openai


def wait_healthy(base_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"no server answers at {base_url} after {timeout:.0f} s")
            time.sleep(0.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base_url")
    p.add_argument("question")
    p.add_argument("--max-tokens", type=int, default=60)
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()
    wait_healthy(args.base_url, args.timeout)
    client = openai.OpenAI(base_url=args.base_url, api_key="not-needed")
    model = client.models.list().data[0].id
    print(f">>> {args.question}   (model {model!r} at {args.base_url})")
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": args.question}],
                                            temperature=0, max_tokens=args.max_tokens, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
