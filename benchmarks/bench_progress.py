"""What progress reporting costs; prints figures, asserts nothing.

    python benchmarks/bench_progress.py [--model smollm2] [--threads N]

Figures:
- the cost of one Progress.decoded call (the engine makes one per llama_decode): without a
  sink, and with a terminal sink that is not yet due (the usual case between redraws);
- the cost of one llama_decode of a single token on the model (a greedy step, the most
  frequent call), so the two can be compared: progress is that fraction of a decode step.
"""

from __future__ import annotations

import argparse
import time


def per_call_ns(fn, n: int = 200_000) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn(1)
    return (time.perf_counter() - started) / n * 1e9


class _NeverDue:
    def due(self, now, elapsed):
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from pytest_refract.audit.progress import Progress

    bare = Progress()
    bare.begin("kld chunk-00", 10**9)
    with_sink = Progress(_NeverDue())
    with_sink.begin("kld chunk-00", 10**9)
    print(f"Progress.decoded without a sink:        {per_call_ns(bare.decoded):7.0f} ns/call")
    print(f"Progress.decoded with a sink, not due:  {per_call_ns(with_sink.decoded):7.0f} ns/call")

    from pytest_refract.engines import llamacpp as E
    from pytest_refract.inputs.data import resolve_model
    from pytest_refract.engines.gguf import read_gguf
    from pytest_refract.engines.kvconfig import parse_kv_config, validate_for_model

    path = resolve_model(args.model)
    eng = E.Engine(path)
    kv = parse_kv_config("ctk=f16,ctv=f16")
    types = validate_for_model(kv, E.cache_types(), *read_gguf(path).head_dims, "reference")
    ctx = eng.context(kv, types, E.ContextSettings(n_ctx=512, n_threads=args.threads), "bench")
    prompt = eng.tokenize("The quick brown fox jumps over the lazy dog.")
    steps = 64
    ctx.reset()
    ctx.evaluate(0, prompt, 0, logits_from=len(prompt) - 1)
    started = time.perf_counter()
    for i in range(steps):
        ctx._step([(prompt[-1], len(prompt) + i, True)], [0])
    step_ns = (time.perf_counter() - started) / steps * 1e9
    print(f"llama_decode, one token ({path.name}, {args.threads} threads): {step_ns / 1e6:7.2f} ms/call")
    print(f"progress per decode step: {100 * per_call_ns(with_sink.decoded) / step_ns:.4f}% of the step")
    eng.close()


if __name__ == "__main__":
    main()
