"""Many Generate calls at once with the asyncio client: the server batches them (different
adapters included) into shared UNet calls.

    python examples/python/concurrent_generate.py [N] [ADAPTER_ID ...]
"""

import asyncio
import sys

from steerserve_client import AsyncClient


async def main(n: int, adapters: list[str]) -> None:
    async with AsyncClient() as client:
        calls = [client.generate(f"a blue square number {i}", seed=i, adapters=adapters[i % len(adapters):][:1]
                                 if adapters else None) for i in range(n)]
        for i, result in enumerate(await asyncio.gather(*calls)):
            path = result.images[0].save(f"square-{i}.png")
            print(f"{path}: seed {result.seeds[0]}, {result.timings.total_seconds:.2f} s on the server "
                  f"({result.timings.queue_seconds:.2f} s queued)")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 4, sys.argv[2:]))
