"""Time to the first batch and peak RSS per process of the data pipeline: 1 and 2 ``jax.distributed``
processes, cold (the tokenized cache is built) and cached (it is read), at several row counts.

  python bench/data_pipeline.py --rows=20000,200000 [--processes=1,2] [--out=/tmp/bench_data]

Rows are conversational pairs of 100-300 words in all (prompt 30-100, each completion 35-100), drawn
deterministically from a word list; the tokenizer is a byte-level BPE (8k vocabulary) with a ChatML
chat template, trained here with ``tokenizers`` and saved by ``transformers``. Each configuration
runs in fresh processes (imports included in the time); the baseline is the 1-process cold run at
the same row count, and ratios are against it. Prints the machine (``lscpu`` model name), the
command and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time

T0 = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import host  # noqa: E402

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no what up out "
    "model data training loss gradient reward policy reference token sequence batch layer attention "
    "value network learning rate step epoch sample prompt answer question because however therefore "
    "example paris france river mountain ocean city history science music language number system"
).split()
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_rows(path: str, n: int, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    with open(path, "w") as f:
        for _ in range(n):
            p, c, r = rng.integers(30, 101), rng.integers(35, 101), rng.integers(35, 101)
            text = lambda k: " ".join(words[rng.integers(0, len(words), size=k)])  # noqa: E731
            row = {
                "prompt": [{"role": "user", "content": text(p)}],
                "chosen": [{"role": "assistant", "content": text(c)}],
                "rejected": [{"role": "assistant", "content": text(r)}],
            }
            f.write(json.dumps(row) + "\n")


def save_tokenizer(path: str) -> None:
    """A byte-level BPE with a ChatML template, saved as transformers saves it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    import numpy as np

    rng = np.random.default_rng(1)
    corpus = [" ".join(rng.choice(WORDS, size=200)) for _ in range(2000)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(path)


def child(args: argparse.Namespace) -> None:
    """One process: the pipeline up to its first batch; prints timings and peak RSS."""
    if args.num_processes > 1:
        from alignjax import sharding

        sharding.initialize_distributed(args.address, args.num_processes, args.process_id)
    t_import = time.perf_counter() - T0
    from alignjax.data import PreferenceData

    data = PreferenceData(
        args.data,
        args.tokenizer,
        cache_dir=args.cache_dir,
        batch_size=8,
        layout="padded",
        max_length=1024,
        buckets=(1024,),
        seed=0,
        process_index=args.process_id,
        process_count=args.num_processes,
    )
    batch = next(data)
    t_first = time.perf_counter() - T0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        "RESULT "
        + json.dumps(
            dict(
                first_batch_s=t_first,
                startup_s=t_import,
                rss_mb=rss_mb,
                rows_kept=data.stats.rows_kept,
                tokens=int((batch["segment_ids"] > 0).sum()),
            )
        ),
        flush=True,
    )
    if args.num_processes > 1:
        import jax

        jax.distributed.shutdown()


def run(data: str, tokenizer: str, cache_dir: str, num_processes: int) -> list[dict]:
    return host.run_children(
        __file__,
        num_processes,
        lambda p, address: [f"--data={data}", f"--tokenizer={tokenizer}", f"--cache_dir={cache_dir}"]
        + [f"--num_processes={num_processes}", f"--process_id={p}", f"--address={address}"],
        devices_per_process=1,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="20000,200000")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--out", default="/tmp/alignjax_bench_data")
    parser.add_argument("--child", action="store_true")
    for name in ("data", "tokenizer", "cache_dir", "address"):
        parser.add_argument(f"--{name}", default="")
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    host.print_header()
    os.makedirs(args.out, exist_ok=True)
    tok = os.path.join(args.out, "tokenizer")
    if not os.path.exists(os.path.join(tok, "tokenizer.json")):
        save_tokenizer(tok)
    header = "| rows | processes | cache | first batch s (slowest process) | x 1-process cold |"
    header += " peak RSS MB/process |"
    header += " RSS x smallest rows |"
    print(header)
    print("|" + "---|" * 7)
    rss_base: dict[tuple[int, str], float] = {}
    for n in (int(x) for x in args.rows.split(",")):
        data = os.path.join(args.out, f"rows{n}.jsonl")
        if not os.path.exists(data):
            write_rows(data, n)
        baseline = None
        for procs in (int(x) for x in args.processes.split(",")):
            cache_dir = os.path.join(args.out, f"cache{n}_p{procs}")
            shutil.rmtree(cache_dir, ignore_errors=True)
            for mode in ("cold", "cached"):
                res = run(data, tok, cache_dir, procs)
                first = max(r["first_batch_s"] for r in res)
                rss = max(r["rss_mb"] for r in res)
                baseline = first if baseline is None else baseline
                rss_base.setdefault((procs, mode), rss)
                print(
                    f"| {n} | {procs} | {mode} | {first:.1f} | {first / baseline:.2f} | {rss:.0f} | "
                    f"{rss / rss_base[(procs, mode)]:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
