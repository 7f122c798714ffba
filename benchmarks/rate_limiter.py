"""Client CPU of the shared rate limiter per send (two hits: the user's and the conversation's budget),
for a loop turn's batch under load: 50 sends of 10 users over 10 conversations, one call each. The
gateway of a cluster pays this for every send (RedisRateLimiter on the Redis of
``REDIS_TEST_URL``, default redis://127.0.0.1:6379/0; the memory limiter for comparison).

    uv run python benchmarks/rate_limiter.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import uvloop

from im.backends.rate_limit import Hit, RateLimiter, Rule
from im.backends.rate_limit.memory import MemoryRateLimiter
from im.backends.rate_limit.redis import RedisRateLimiter

REDIS_URL = os.environ.get("REDIS_TEST_URL", "redis://127.0.0.1:6379/0")


async def measure(limiter: RateLimiter, rounds: int, calls: int) -> list[float]:
    user, conv = Rule("bench-user", 1_000_000, 60.0), Rule("bench-conv", 1_000_000, 60.0)
    hits: list[Hit] = []
    for i in range(50):
        hits += [Hit(user, str(i % 10)), Hit(conv, f"d:{i % 10}:{i % 10 + 100}")]
    for _ in range(50):
        await limiter.check(hits)
    per_send = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(calls):
            await limiter.check(hits)
        per_send.append((time.process_time() - started) / (calls * 50) * 1e6)
    return per_send


async def main(args: argparse.Namespace) -> None:
    for name, limiter in (
        ("redis", RedisRateLimiter(REDIS_URL, prefix="im-bench-rl:")),
        ("memory", MemoryRateLimiter()),
    ):
        await limiter.start()
        try:
            figures = await measure(limiter, args.rounds, args.calls)
        finally:
            await limiter.close()
        print(f"{name:7s} client CPU per send: median {statistics.median(figures):.2f} us (min {min(figures):.2f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=400, help="limiter calls per round (50 sends each)")
    uvloop.run(main(parser.parse_args()))
