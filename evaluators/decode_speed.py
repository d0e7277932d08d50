"""Decode speed of one GGUF under the llama.cpp build of the Python running this script, as
llama-bench measures it: a prompt of P tokens in one batch (pp) and G tokens generated one at a
time (tg), from an empty cache, median of R repetitions.

It imports only llama_cpp and the standard library, so `evaluators/llama_builds.sh` can run it in
a bare virtual environment per candidate build. `--no-extra-bufts` loads the model with
llama_model_params.use_extra_bufts = false (no AMX or repacked weight layouts).

    python evaluators/decode_speed.py MODEL.gguf [--no-extra-bufts] [--threads 2]
prints one JSON line: {"pp_tok_s": …, "tg_tok_s": …, "system_info": …, "extra_bufts": …}.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time

_quiet = None


def measure(path: str, *, extra_bufts: bool, threads: int, prompt: int, generate: int, reps: int) -> dict:
    import llama_cpp as lc

    global _quiet  # the ctypes callback must outlive every llama.cpp call that may log
    _quiet = lc.llama_log_callback(lambda *_: None)
    lc.llama_log_set(_quiet, ctypes.c_void_p(0))
    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    mp.use_extra_bufts = extra_bufts
    model = lc.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise SystemExit(f"{path}: llama.cpp could not load the model")
    cp = lc.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = prompt + generate
    cp.n_threads = cp.n_threads_batch = threads
    ctx = lc.llama_init_from_model(model, cp)
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    # fixed pseudo-random token ids (llama-bench uses random tokens too): speed does not depend on them
    ids = [(7919 * i + 13) % n_vocab for i in range(prompt + generate)]

    def run() -> tuple[float, float]:
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        arr = (lc.llama_token * prompt)(*ids[:prompt])
        t0 = time.perf_counter()
        if lc.llama_decode(ctx, lc.llama_batch_get_one(arr, prompt)) != 0:
            raise SystemExit("llama_decode failed on the prompt")
        t1 = time.perf_counter()
        for i in range(generate):
            one = (lc.llama_token * 1)(ids[prompt + i])
            if lc.llama_decode(ctx, lc.llama_batch_get_one(one, 1)) != 0:
                raise SystemExit("llama_decode failed while generating")
        t2 = time.perf_counter()
        return prompt / (t1 - t0), generate / (t2 - t1)

    run()  # warm-up: first-touch page faults, thread start
    pp, tg = zip(*(run() for _ in range(reps)))
    info = lc.llama_print_system_info().decode().strip()
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    return {
        "pp_tok_s": statistics.median(pp), "tg_tok_s": statistics.median(tg), "reps": reps, "prompt": prompt,
        "generate": generate, "threads": threads, "extra_bufts": extra_bufts, "system_info": info,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--no-extra-bufts", action="store_true", help="load without extra buffer types (AMX, repack)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--generate", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    r = measure(a.model, extra_bufts=not a.no_extra_bufts, threads=a.threads, prompt=a.prompt, generate=a.generate, reps=a.reps)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
