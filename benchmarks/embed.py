"""`ssl-pipeline embed` on the legal domain's encoder (the default block's model, pretrained for a
few steps on 300 license texts): (a) peak memory of embedding a folder of N files and of 10N
files, each in a process of its own, and their ratio; (b) embedding throughput over the N
folder (rows/s, the encoder's loading excluded) against the bare encoder's collate + forward on
the same texts read beforehand, and the same with the next chunk prepared in a thread (the GPU path).

    .venv/bin/python benchmarks/embed.py [--files 2000] [--repeats 3] [--batch-size 64]

5 minutes on the busy 2-core VM of BENCHMARKS.md (about 2 by the rates it reaches idle), most of
it embedding the 10N folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import stage_env  # noqa: E402


def build_project(root: Path) -> None:
    """The default legal block (its model: 2 layers of 128, windows of 64 tokens, 256 per document)
    on 300 license texts, pretrained for 8 steps: the encoder's cost, not its quality, is measured."""
    from tasks.cli import run_stage

    block = yaml.safe_load((REPO / "params.yaml").read_text())["domains"]["legal"]
    block["default_data"]["max_files"] = 300
    block["pretrain"].update(steps=8, checkpoint_every=8, warmup_steps=1, rankme_samples=32)
    (root / "params.yaml").write_text(yaml.safe_dump({"domains": {"legal": block}}, sort_keys=False))
    for stage in ("default_data", "ingest", "preprocess", "pretrain"):
        run_stage(stage, "legal", root)


def write_folder(root: Path, folder: Path, n_files: int) -> None:
    """`n_files` license texts of the corpus, cycled, each made unique by a last line (no two
    files are copies, which embed would read once per chunk)."""
    texts = sorted((root / "data/legal/default/corpus").glob("*.txt"))
    folder.mkdir(parents=True)
    for i in range(n_files):
        source = texts[i % len(texts)]
        (folder / f"{i // 100:03d}").mkdir(exist_ok=True)
        (folder / f"{i // 100:03d}" / f"{i:05d}-{source.name}").write_text(
            source.read_text(encoding="utf-8", errors="replace") + f"\n(copy {i})\n", encoding="utf-8")


def peak_memory_child(root: Path, folder: Path, out: Path, batch_size: int) -> None:
    """In a process of its own: embed the folder; print the process's peak resident memory and the
    peak of the Python heap while `embed` ran (tracemalloc, started after a warm-up embed of one
    file has imported everything: the lists, dicts, rows and numpy arrays that would grow with the
    folder; torch's tensors are not in it)."""
    import shutil
    import tracemalloc

    from tasks.embed import embed

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(next(folder.rglob("*.txt")), tmp)
        embed(root, "legal", Path(tmp), Path(tmp) / "warm.parquet", batch_size=batch_size)
    tracemalloc.start()
    summary = embed(root, "legal", folder, out, batch_size=batch_size)
    heap_peak = tracemalloc.get_traced_memory()[1]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"embedded": summary["embedded"], "peak_mib": peak_kib / 1024, "heap_peak_mib": heap_peak / 2**20}))


def peak_memory(root: Path, folder: Path, out: Path, batch_size: int) -> dict:
    run = subprocess.run([sys.executable, __file__, "--child", str(root), str(folder), str(out),
                          "--batch-size", str(batch_size)], capture_output=True, text=True, env=stage_env(), check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def throughput(root: Path, folder: Path, out: Path, batch_size: int,
               repeats: int) -> tuple[dict[str, list[float]], int]:
    """Seconds per pass over the folder's texts, `repeats` rounds of three passes back to back (so
    the three see the same load on a shared machine): `bare`, the encoder's collate + forward in
    batches (`tasks.probes.embed_rows`) on the texts read beforehand; `embed`, the command's
    function as it runs here (chunks in turn on the CPU) less the loading of the encoder, timed
    alone in the same round; `ahead`, the same with the next chunk prepared in a thread (the GPU
    path, `tasks.embed.reads_ahead`). Also returns the rows of a pass."""
    import tasks.embed as embedding
    from ssl_models.core.domain import Record, Source
    from tasks.probes import embed_rows

    target = embedding.embedding_target(root, "legal", "ssl")
    cfg, domain = target.cfg, target.domain
    texts = [{"text": record.content} for path in sorted(folder.rglob("*.txt"))
             for record in domain.read(Source(path.name, [path]), cfg) if isinstance(record, Record)]
    embedding.embed(root, "legal", folder, out, batch_size=batch_size)  # warm: imports, first-call work
    on_cpu = embedding.reads_ahead
    seconds: dict[str, list[float]] = {"bare": [], "embed": [], "ahead": [], "load": []}
    for _ in range(repeats):
        started = time.perf_counter()
        encoder = embedding.embedding_target(root, "legal", "ssl").load_encoder()
        seconds["load"].append(time.perf_counter() - started)
        started = time.perf_counter()
        embed_rows(encoder, texts, batch_size, precision=cfg.finetune.precision)
        seconds["bare"].append(time.perf_counter() - started)
        for mode, rule in (("embed", on_cpu), ("ahead", lambda device: True)):
            embedding.reads_ahead = rule
            started = time.perf_counter()
            summary = embedding.embed(root, "legal", folder, out, batch_size=batch_size)
            seconds[mode].append(time.perf_counter() - started - seconds["load"][-1])
            assert summary["embedded"] == len(texts)
        embedding.reads_ahead = on_cpu
    return seconds, len(texts)


def main() -> None:
    parser = argparse.ArgumentParser()
    # N spans several chunks (of 4 batches): the allocators' first chunks raise the resident size by ~10%
    # before it levels off (measured: 1171 MiB after 2 chunks, 1307 after 6, 1315 from then to 12)
    parser.add_argument("--files", type=int, default=2000, help="N: the small folder's files (the large one: 10 N); "
                        "several chunks of 16 batches, so that both folders run at their steady state")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the throughput passes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--child", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_memory_child(*args.child, batch_size=args.batch_size)
        return
    from ssl_models.core.offline import apply_offline_env

    apply_offline_env()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "project"
        root.mkdir()
        started = time.perf_counter()
        build_project(root)
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores; project built and pretrained in "
              f"{time.perf_counter() - started:.0f} s")
        small, large = Path(tmp) / "small", Path(tmp) / "large"
        write_folder(root, small, args.files)
        write_folder(root, large, 10 * args.files)
        memory = {n: peak_memory(root, folder, Path(tmp) / f"memory-{n}.parquet", args.batch_size)
                  for n, folder in ((args.files, small), (10 * args.files, large))}
        for n, result in memory.items():
            print(f"{n:>5} files: peak resident {result['peak_mib']:.0f} MiB, peak Python heap during embed "
                  f"{result['heap_peak_mib']:.1f} MiB ({result['embedded']} embedded)")
        small_run, large_run = memory[args.files], memory[10 * args.files]
        print(f"ratio 10N / N: peak resident {large_run['peak_mib'] / small_run['peak_mib']:.3f} (target: at most "
              f"1.10), Python heap {large_run['heap_peak_mib'] / small_run['heap_peak_mib']:.3f}")
        load_before = os.getloadavg()[0]
        seconds, rows = throughput(root, small, Path(tmp) / "throughput.parquet", args.batch_size, args.repeats)
        print(f"throughput on {rows} files, batch {args.batch_size}, {args.repeats} rounds (load average "
              f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after; encoder loading "
              f"{min(seconds['load']):.2f} s, excluded):")
        for mode in ("bare", "embed", "ahead"):
            print(f"  {mode:<6} {' '.join(f'{rows / s:6.0f}' for s in seconds[mode])} rows/s")
        for mode in ("embed", "ahead"):
            pairs = sorted(b / s for b, s in zip(seconds["bare"], seconds[mode]))
            print(f"  {mode} / bare: best against best {min(seconds['bare']) / min(seconds[mode]):.3f}, "
                  f"median of the rounds {pairs[len(pairs) // 2]:.3f} (target: at least 0.9)")


if __name__ == "__main__":
    main()
