"""The data side at scale (issue 23): parallel ingest and preprocess against one worker, ingest's
read rate against `sha256sum`, and what DVC costs on a corpus of many small files.

    python benchmarks/data_scale.py speedup [--texts 20000] [--slides 160] [--volumes 96] [--series 48]
    python benchmarks/data_scale.py dvc --files 100000
    python benchmarks/data_scale.py memory --sizes 100000 1000000 [--stage preprocess] [--domain legal]
    python benchmarks/data_scale.py floor --files 1000000

`speedup`: each stage runs as the CLI runs it (`ssl-pipeline STAGE DOMAIN` in the project
folder), with `workers: 1` and `workers: 2` alternated, twice each, on the same generated corpus;
the ratio is best against best. Beside it, `sha256sum` (2 processes, `xargs -P 2`) over the same
files: ingest's bytes per second against it, with warm caches on both sides (dropping the page
cache needs privileges this machine does not give).

Also beside it, the floor of any Python ingest: the same files read and hashed with `hashlib` in 2
processes (forkserver, chunks of 256, nothing else done): where it is far below `sha256sum` (many
small files: Python's per-file cost), no ingest written in Python reaches `sha256sum`'s rate.
`--pin-threads` runs the stages with one intra-op thread a process (OMP_NUM_THREADS=1): one
worker then uses one core, as each of two workers does, where torch would otherwise spread one
worker's resampling over every core.

`dvc`: a DVC project of this checkout with a legal corpus of N short texts in folders of 1,000:
`dvc repro -s ingest@legal` cold (DVC hashes the corpus, ingest reads it), its peak resident memory,
then a no-op `dvc repro` and a `dvc status` of the same workspace.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, SCRIPTS, copy_project_code, stage_env  # noqa: E402

WORDS = ("the lessee shall pay rent agreement term party notice clause liability indemnify warranty "
         "termination breach supplier deliver goods services confidential information court law").split()


def write_texts(corpus: Path, count: int, words: int = 60, per_folder: int = 1000) -> int:
    rng = np.random.default_rng(0)
    total = 0
    for i in range(count):
        folder = corpus / f"{i // per_folder:05d}"
        if i % per_folder == 0:
            folder.mkdir(parents=True, exist_ok=True)
        text = f"Document {i}. " + " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), words)) + ".\n"
        (folder / f"doc-{i:07d}.txt").write_text(text)
        total += len(text)
    return total


def write_slides(corpus: Path, count: int, size: int = 768) -> None:
    from PIL import Image
    from skimage.data import immunohistochemistry

    image = immunohistochemistry()
    tiled = np.tile(image, (2, 2, 1))
    corpus.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        top, left = (i * 37) % (tiled.shape[0] - size), (i * 53) % (tiled.shape[1] - size)
        Image.fromarray(tiled[top:top + size, left:left + size]).save(corpus / f"slide-{i:04d}.png")


def write_volumes(corpus: Path, count: int, size: int = 96) -> None:
    import nibabel as nib
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    corpus.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        volume = gaussian_filter(rng.normal(0, 400, (size, size, size)), 3).astype(np.int16) - 600
        nib.save(nib.Nifti1Image(volume, np.diag([1.2, 1.2, 1.5, 1.0])), corpus / f"ct-{i:04d}.nii.gz")


SERIES_SLICES = 48  # the slices of a generated DICOM series


def write_dicom(corpus: Path, count: int, slices: int = SERIES_SLICES, size: int = 64) -> None:
    """`count` CT series of `slices` single-frame DICOM files each (pydicom's bundled CT_small.dcm as
    the template: a PACS export's layout, a folder a series), smooth random HU."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid
    from scipy.ndimage import gaussian_filter

    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    rng = np.random.default_rng(0)
    for series in range(count):
        folder = corpus / f"patient-{series % 97:03d}" / f"series-{series:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        volume = gaussian_filter(rng.normal(0, 400, (slices, size, size)), 2).astype(np.int16) + 1024
        uid = generate_uid()
        for k in range(slices):
            ds = template.copy()
            ds.PatientID, ds.SeriesInstanceUID, ds.SOPInstanceUID = f"P{series % 97}", uid, generate_uid()
            ds.InstanceNumber, ds.ImagePositionPatient = k + 1, [0.0, 0.0, 2.0 * k]
            ds.ImageOrientationPatient, ds.PixelSpacing = [1, 0, 0, 0, 1, 0], [0.8, 0.8]
            ds.Rows = ds.Columns = size
            ds.PixelData = volume[k].tobytes()
            ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)


def params_for(domain: str, corpus: str, workers: int) -> dict:
    blocks = {
        "legal": {"module": "legal_text", "corpus": corpus, "labels": None},
        "histo": {"module": "histopathology", "corpus": corpus, "labels": None,
                  "preprocess": {"tile_size": 64, "stride": 64, "workers": workers}},
        "medical": {"module": "medical3d", "corpus": corpus, "labels": None,
                    "ingest": {"nifti_modality": "ct"}, "preprocess": {"workers": workers}},
        "dicom": {"module": "medical3d", "corpus": corpus, "labels": None, "preprocess": {"workers": workers}},
    }
    block = blocks[domain]
    block.setdefault("ingest", {})["workers"] = workers
    return {"domains": {domain: block}}


PINNED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # --pin-threads: one intra-op thread a process
ENV_EXTRA: dict[str, str] = {}


def timed(folder: Path, *command: str) -> float:
    started = time.perf_counter()
    subprocess.run([str(SCRIPTS / command[0]), *command[1:]], cwd=folder, env={**stage_env(), **ENV_EXTRA},
                   check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def stage_speedup(folder: Path, domain: str, stage: str, corpus: str) -> dict[int, list[float]]:
    """Seconds of `stage` at 1 and 2 workers, alternated, twice each (ingest done first when needed)."""
    times: dict[int, list[float]] = {1: [], 2: []}
    for workers in (1, 2, 1, 2):
        (folder / "params.yaml").write_text(yaml.safe_dump(params_for(domain, corpus, workers)))
        if stage == "preprocess" and not (folder / f"data/{domain}/manifest").exists():
            timed(folder, "ssl-pipeline", "ingest", domain)
        shutil.rmtree(folder / f"data/{domain}/{'manifest' if stage == 'ingest' else 'shards'}", ignore_errors=True)
        times[workers].append(timed(folder, "ssl-pipeline", stage, domain))
    return times


def sha256sum_seconds(corpus: Path) -> float:
    started = time.perf_counter()
    subprocess.run(f"find {corpus} -type f -print0 | xargs -0 -P 2 -n 256 sha256sum > /dev/null", shell=True,
                   check=True)
    return time.perf_counter() - started


def _hash_files(paths: list[str]) -> int:
    import hashlib

    for path in paths:
        with open(path, "rb") as handle:
            hashlib.sha256(handle.read()).hexdigest()
    return len(paths)


def python_hash_seconds(corpus: Path) -> float:
    """The corpus walked (sorted) and every file read and hashed with hashlib in 2 processes."""
    import multiprocessing

    started = time.perf_counter()
    files = [os.path.join(top, name) for top, _, names in sorted(os.walk(corpus)) for name in sorted(names)]
    with multiprocessing.get_context("forkserver").Pool(2) as pool:
        assert sum(pool.imap(_hash_files, [files[i:i + 256] for i in range(0, len(files), 256)])) == len(files)
    return time.perf_counter() - started


def corpus_bytes(corpus: Path) -> int:
    return sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file())


def speedup(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="data-scale-"))
    volumes = functools.partial(write_volumes, size=args.volume_size)
    cases = [("legal", "ingest", args.texts, write_texts), ("histo", "ingest", args.slides, write_slides),
             ("histo", "preprocess", args.slides, write_slides), ("medical", "ingest", args.volumes, volumes),
             ("medical", "preprocess", args.volumes, volumes), ("dicom", "ingest", args.series, write_dicom)]
    if args.pin_threads:
        ENV_EXTRA.update(PINNED)
    print(f"machine: {os.cpu_count()} cores; load before: {open('/proc/loadavg').read().split()[:3]}"
          f"{'; one intra-op thread a process' if args.pin_threads else ''}")
    made: set[str] = set()
    for domain, stage, count, write in cases:
        if args.only and f"{domain}-{stage}" not in args.only:
            continue
        folder = work / domain
        corpus = folder / "corpus"
        if domain not in made:
            folder.mkdir()
            write(corpus, count)
            made.add(domain)
        times = stage_speedup(folder, domain, stage, "corpus")
        best1, best2 = min(times[1]), min(times[2])
        what = f"{count} series of {SERIES_SLICES} slices" if domain == "dicom" else f"{count} files"
        line = (f"{domain} {stage}: {what}, 1 worker {best1:.1f} s, 2 workers {best2:.1f} s "
                f"(all: {times}) -> x{best1 / best2:.2f}")
        if stage == "ingest":
            size = corpus_bytes(corpus)
            sums = min(sha256sum_seconds(corpus) for _ in range(2))
            floor = min(python_hash_seconds(corpus) for _ in range(2))
            line += (f"; {size / 2**20:.1f} MiB: ingest (2 workers) {size / best2 / 2**20:.1f} MiB/s, sha256sum -P2 "
                     f"{size / sums / 2**20:.1f} MiB/s -> x{sums / best2:.3f} of sha256sum's rate; hashlib alone in "
                     f"2 processes {size / floor / 2**20:.1f} MiB/s (x{sums / floor:.3f} of sha256sum's rate)")
        print(line, flush=True)
    shutil.rmtree(work, ignore_errors=True)


def peak_rss_and_seconds(folder: Path, *command: str) -> tuple[float, float]:
    """(seconds, peak resident MiB of the largest process) of `command`, through GNU time."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", str(SCRIPTS / command[0]), *command[1:]], cwd=folder,
                            env=stage_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{command} failed in {folder}:\n{result.stderr[-3000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    return seconds, int(peak.group(1)) / 1024 if peak else float("nan")


def dvc_scale(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="dvc-scale-"))
    copy_project_code(folder)
    started = time.perf_counter()
    size = write_texts(folder / "corpus", args.files)
    print(f"{args.files} files ({size / 2**20:.1f} MiB of text) written in {time.perf_counter() - started:.0f} s",
          flush=True)
    params = {"domains": {"legal": yaml.safe_load((REPO / "params.yaml").read_text())["domains"]["legal"]}}
    params["domains"]["legal"].update(corpus="corpus")
    params["domains"]["legal"].setdefault("ingest", {})["workers"] = args.workers
    # dvc.yaml declares the labels file as a dependency: DVC cannot take a null one (a few labels, then)
    labels = "".join(f"00000/doc-{i:07d}.txt,{'a' if i % 2 else 'b'}\n" for i in range(min(args.files, 200)))
    (folder / "labels.csv").write_text("path,label\n" + labels)
    params["domains"]["legal"]["labels"] = "labels.csv"
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    seconds, rss = peak_rss_and_seconds(folder, "dvc", "repro", "-s", "ingest@legal")
    print(f"cold `dvc repro -s ingest@legal`: {seconds:.1f} s, peak RSS {rss:.0f} MiB", flush=True)
    noop = min(peak_rss_and_seconds(folder, "dvc", "repro", "-s", "ingest@legal")[0] for _ in range(2))
    status = min(peak_rss_and_seconds(folder, "dvc", "status", "ingest@legal")[0] for _ in range(2))
    print(f"no-op `dvc repro -s ingest@legal`: {noop:.1f} s ({noop / seconds:.1%} of the cold run); "
          f"`dvc status ingest@legal`: {status:.1f} s -> no-op repro x{noop / status:.2f} of status", flush=True)
    if args.preprocess:
        both = ("ingest@legal", "preprocess@legal")
        seconds, rss = peak_rss_and_seconds(folder, "dvc", "repro", "-s", "preprocess@legal")
        print(f"`dvc repro -s preprocess@legal`: {seconds:.1f} s, peak RSS {rss:.0f} MiB", flush=True)
        for listed in (False, True):  # the corpus not a dependency of preprocess (dvc.yaml), then listed again
            if listed:
                text = (folder / "dvc.yaml").read_text()
                listed = text.replace("      deps:\n        - data/${key}/manifest\n",
                                      "      deps:\n        - ${item.corpus}\n        - data/${key}/manifest\n", 1)
                if listed == text:
                    raise SystemExit("dvc.yaml's preprocess deps are not as this benchmark expects: nothing compared")
                (folder / "dvc.yaml").write_text(listed)
                subprocess.run([str(SCRIPTS / "dvc"), "commit", "-f", "preprocess@legal"], cwd=folder, env=stage_env(),
                               check=True, capture_output=True)
            status = min(peak_rss_and_seconds(folder, "dvc", "status", *both)[0] for _ in range(2))
            noop = min(peak_rss_and_seconds(folder, "dvc", "repro", "-s", *both)[0] for _ in range(2))
            print(f"corpus {'listed' if listed else 'not listed'} as a dependency of preprocess: `dvc status` of both "
                  f"stages {status:.1f} s, no-op `dvc repro -s` of both {noop:.1f} s", flush=True)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        print(f"kept: {folder}")


def ingest_memory(args: argparse.Namespace) -> None:
    """Peak resident memory and time of `ssl-pipeline STAGE DOMAIN` alone (no DVC) at each size
    (`--stage preprocess`: ingest first, unmeasured): short texts, 768-pixel PNG slides (64-pixel
    tiles) or 96-voxel CT volumes."""
    write = {"legal": write_texts, "histo": write_slides, "medical": write_volumes}[args.domain]
    for count in args.sizes:
        folder = Path(tempfile.mkdtemp(prefix="ingest-memory-"))
        write(folder / "corpus", count)
        (folder / "params.yaml").write_text(yaml.safe_dump(params_for(args.domain, "corpus", args.workers)))
        if args.stage == "preprocess":
            timed(folder, "ssl-pipeline", "ingest", args.domain)
        seconds, rss = peak_rss_and_seconds(folder, "ssl-pipeline", args.stage, args.domain)
        print(f"{args.domain} {args.stage} alone, {count} files, {args.workers} workers: {seconds:.1f} s, "
              f"peak RSS {rss:.0f} MiB", flush=True)
        shutil.rmtree(folder, ignore_errors=True)


def stat_floor(args: argparse.Namespace) -> None:
    """What any check for a changed, added or removed raw file must do at least: one stat a file.
    `find -printf` (C) and this project's own corpus walk plus one `os.stat` a file, twice each."""
    from tasks.sources import CorpusListing, walk_corpus

    folder = Path(tempfile.mkdtemp(prefix="stat-floor-"))
    write_texts(folder / "corpus", args.files)
    for _ in range(2):
        started = time.perf_counter()
        subprocess.run(f"find '{folder}/corpus' -type f -printf '%s %T@\\n' > /dev/null", shell=True, check=True)
        print(f"find -printf size and mtime of {args.files} files: {time.perf_counter() - started:.1f} s", flush=True)
        started = time.perf_counter()
        count = sum(1 for path in walk_corpus(folder / "corpus", None, CorpusListing()) if os.stat(path))
        print(f"walk_corpus and os.stat of {count} files: {time.perf_counter() - started:.1f} s", flush=True)
    shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("speedup")
    one.add_argument("--texts", type=int, default=20000)
    one.add_argument("--slides", type=int, default=160)
    one.add_argument("--volumes", type=int, default=96)
    one.add_argument("--volume-size", type=int, default=96, help="voxels along each axis of a generated CT volume")
    one.add_argument("--series", type=int, default=48, help=f"DICOM series of {SERIES_SLICES} slices (dicom-ingest)")
    one.add_argument("--only", nargs="*", help="cases to run: legal-ingest histo-ingest histo-preprocess ...")
    one.add_argument("--pin-threads", action="store_true", help="OMP_NUM_THREADS=1 for every stage run")
    two = commands.add_parser("dvc")
    two.add_argument("--files", type=int, default=100000)
    two.add_argument("--workers", type=int, default=2)
    two.add_argument("--keep", action="store_true")
    two.add_argument("--preprocess", action="store_true", help="also preprocess, and time both stages' no-op with "
                     "and without the corpus as a dependency of preprocess")
    three = commands.add_parser("memory")
    three.add_argument("--sizes", type=int, nargs="+", default=[100000, 1000000])
    three.add_argument("--workers", type=int, default=2)
    three.add_argument("--stage", choices=["ingest", "preprocess"], default="ingest")
    three.add_argument("--domain", choices=["legal", "histo", "medical"], default="legal")
    four = commands.add_parser("floor")
    four.add_argument("--files", type=int, default=1000000)
    args = parser.parse_args()
    {"speedup": speedup, "dvc": dvc_scale, "memory": ingest_memory, "floor": stat_floor}[args.command](args)


if __name__ == "__main__":
    main()
