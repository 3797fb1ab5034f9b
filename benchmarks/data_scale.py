"""Tokenizer training and data preparation on a corpus of N MB: speed and peak memory of each step.

Builds N MB of unique stories from the shared TinyStories sample (each copy of a story made distinct by a closing
sentence with the copy's number) in one `<|endoftext|>` text file, then runs each step in its own child process, as a
user's command would run: `tinylm tokenizer train` and `tinylm data prepare` of a recipe (aurelius-4m by default)
on it. Peak memory is the child's maximum resident set (wait4's rusage). The reference, measured in the same run and
in a child process too, is the tokenizer's own `encode_batch` on all cores over the first stories of the corpus, held
in memory. The last line printed is JSON.

    python benchmarks/data_scale.py --mb 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / ".." / "shared" / "data" / "tinystories"
SEPARATOR = "\n<|endoftext|>\n"

STEP = """
import json, sys, time
from tinylm.data.prepare import prepare_run_inputs, train_run_tokenizer
from tinylm.recipe import load_recipe
from tinylm.storage.rundir import RunDir
step, name, corpus, run, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
recipe = load_recipe(name, [f"data.paths=[{json.dumps(corpus)}]", *overrides])
started = time.perf_counter()
if step == "tokenizer":
    train_run_tokenizer(recipe, RunDir(run), progress=False)
else:
    prepare_run_inputs(recipe, RunDir(run), progress=False)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""

ENCODE = """
import json, sys, time
from tinylm.data.shards import ENCODE_CHUNK
from tinylm.data.tokenizer import load_tokenizer
tokenizer = load_tokenizer(sys.argv[2])
with open(sys.argv[1], "rb") as handle:
    text = handle.read(int(sys.argv[3])).decode("utf-8", "ignore")
stories = [s.strip() for s in text.split("<|endoftext|>")[:-1] if s.strip()]
n_bytes = sum(len(s.encode("utf-8")) for s in stories)
started = time.perf_counter()
for start in range(0, len(stories), ENCODE_CHUNK):
    tokenizer.encode_batch(stories[start:start + ENCODE_CHUNK])
print(json.dumps({"seconds": time.perf_counter() - started, "bytes": n_bytes}))
"""


def build_corpus(path: Path, megabytes: float) -> int:
    """N MB of unique stories: the sample's stories over and over, copy k of each ending in its own sentence."""
    from tinylm.data.corpus import Corpus

    stories = list(Corpus(sorted(SAMPLE.glob("*.txt.gz"))))
    target, written, copy = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            copy += 1
            block = SEPARATOR.join(f"{story}\nThat was tale number {copy}." for story in stories) + SEPARATOR
            out.write(block)
            written += len(block.encode("utf-8"))
    return path.stat().st_size


def run_child(code: str, *argv: str) -> dict:
    """Run a Python snippet in a child process; its JSON line, wall time and peak resident memory."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"child failed ({child.returncode}): {' '.join(argv)}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(wall_seconds=time.perf_counter() - started, peak_rss_mb=usage.ru_maxrss / 1024)  # KiB on Linux
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=300, help="corpus size in MB (default 300)")
    parser.add_argument("--recipe", default="aurelius-4m")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe overrides")
    parser.add_argument("--encode-mb", type=float, default=64, help="text the raw encode_batch rate is measured on")
    parser.add_argument("--dir", default="", help="where the corpus and run go (default: a temporary directory)")
    args = parser.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="tinylm-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, run = work / "corpus.txt", work / "run"
    shutil.rmtree(run, ignore_errors=True)
    try:
        size = build_corpus(corpus, args.mb)
        mb = size / 1e6
        print(f"corpus: {mb:,.1f} MB in {corpus}", flush=True)
        steps = {}
        for step in ("tokenizer", "prepare"):
            steps[step] = run_child(STEP, step, args.recipe, str(corpus), str(run), *args.overrides)
            steps[step]["mb_per_s"] = mb / steps[step]["seconds"]
            print(f"{step}: {steps[step]['seconds']:.1f} s ({steps[step]['mb_per_s']:.2f} MB/s), peak memory "
                  f"{steps[step]['peak_rss_mb']:,.0f} MB", flush=True)
        encode = run_child(ENCODE, str(corpus), str(run / "tokenizer.json"), str(int(min(args.mb, args.encode_mb)
                                                                                     * 1e6)))
        encode["mb_per_s"] = encode["bytes"] / 1e6 / encode["seconds"]
        ratio = steps["prepare"]["mb_per_s"] / encode["mb_per_s"]
        print(f"encode_batch alone: {encode['mb_per_s']:.2f} MB/s on {encode['bytes'] / 1e6:,.0f} MB in memory; "
              f"data preparation runs at {ratio:.2f}x that", flush=True)
        print(json.dumps({"mb": round(mb, 1), "recipe": args.recipe, "overrides": args.overrides,
                          "cpus": os.cpu_count(), "tokenizer_train": steps["tokenizer"],
                          "data_prepare": steps["prepare"], "encode_batch": encode,
                          "prepare_vs_encode_batch": ratio}))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
