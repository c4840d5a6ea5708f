"""The one entry to every stage: `ssl-pipeline <stage> <domain>` (dvc.yaml and the flow call it).

Also `ssl-pipeline lineage show|verify <artifact folder>` and `ssl-pipeline lineage which <record>`.
The whole domain block of params.yaml is parsed and checked before any stage works.

Exit status and what is printed (always one line on stderr, never a traceback; what comes from
data or file names, there and on stdout, has its control characters escaped: `printable`):
- 0: done.
- 2: bad input or configuration (`PipelineError`), and what else the user must fix: a full disk
  (ENOSPC, EDQUOT: the line names the disk's file), a weights file that is not weights-only or not
  safetensors (never loaded). The line names the file or setting and the fix. The Prefect flow
  never retries it.
- 75: another run holds this domain's lock and did not let go within SSL_PIPELINE_LOCK_TIMEOUT.
- 1: anything else, a bug or a machine fault: the line names the error and the log file under
  `.ssl-pipeline/logs/` that holds the traceback (owner-readable only). The flow retries it.
- 143 (SIGTERM) or 130 (SIGINT), 128 + the signal as a shell reports it: cancelled (`cancelled: ...`).

A cancel stops the work: SIGTERM or SIGINT to a stage (a scheduler's cancel, Ctrl-C, the flow
stopping it) is forwarded as SIGTERM to every process under it (torchrun and its workers, loader
and fine-tuning workers), and the stage unwinds as on Ctrl-C: temporaries removed, the lock held
until every one of those processes is gone, then released. Checkpoints are whole files, so the
next run resumes from the last one. A stage DVC started (`dvc repro`, the flow) also gets SIGTERM
from the kernel when that process dies (DVC itself dies at once on SIGTERM): no stage trains on as
an orphan holding its domain's lock. A second signal while unwinding is forwarded, not raised.
(DVC ignores SIGINT while its stage runs: Ctrl-C reaches the stage through the terminal's group.)

One run at a time per domain: a stage takes `.ssl-pipeline/locks/<domain>.lock` (fcntl.flock,
released by the kernel when the process dies, so a killed run never leaves it held). A second
run of any stage of the same domain (the nightly flow and a manual call) waits for it, logging
once a minute who holds it (pid, stage, since when), for up to SSL_PIPELINE_LOCK_TIMEOUT seconds
(default 3600; 0 refuses at once), then stops with exit status 75. Two domains run side by side.
The processes a stage starts under torch.distributed.run inherit its lock (they find the holder's
pid in SSL_PIPELINE_LOCK_HOLDER) and do not wait for it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import importlib
import json
import logging
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from ssl_models.core.config import DomainConfig
    from ssl_models.core.domain import Domain

# The stages in data-flow order: dvc.yaml declares one entry each (a test holds them equal),
# and the Prefect flow runs them in this order. Stage `s` is the function `tasks.stages.<s>.<s>`,
# called as `s(cfg, domain, paths)`.
STAGES = ("default_data", "ingest", "preprocess", "pretrain", "finetune", "evaluate", "report", "export")

LOCK_TIMEOUT_ENV = "SSL_PIPELINE_LOCK_TIMEOUT"
LOCK_HOLDER_ENV = "SSL_PIPELINE_LOCK_HOLDER"  # "<lock file>:<pid>" of the stage process holding it
DEFAULT_LOCK_TIMEOUT = 3600.0
EXIT_ERROR, EXIT_BAD_INPUT, EXIT_BUSY = 1, 2, 75
CANCEL_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DVC_STAGE_ENV = "DVC_STAGE"  # set by DVC in every stage command it runs
# seconds the processes under a cancelled stage get to exit after its SIGTERM before SIGKILL: they
# got it when the stage did, and every write is atomic (a SIGKILL loses no finished file)
STOP_GRACE_SECONDS = 2.0

log = logging.getLogger("ssl-pipeline")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssl-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="project root holding params.yaml (default: the working directory)")
    commands = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        if stage == "export":
            continue
        sub = commands.add_parser(stage, help=f"run the {stage} stage for one domain")
        sub.add_argument("domain", help="a block name under `domains:` in params.yaml")
        if stage == "ingest":
            sub.add_argument("--new-salt", action="store_true",
                             help="make the domain's pseudonym salt anew, on purpose (its file is missing): every "
                                  "pseudonym and key of the domains using it changes, and everything from ingest on "
                                  "re-runs")
    lineage = commands.add_parser("lineage", help="show or verify an artifact's lineage, or find what used a record")
    lineage.add_argument("action", choices=("show", "verify", "which", "diff"))
    lineage.add_argument("artifact", help="show/verify/diff: an artifact folder, e.g. models/legal/finetune; "
                                          "which: a raw record's key (file name in the corpus, or its "
                                          "pseudonym) or its sha256")
    lineage.add_argument("other", nargs="?", type=Path,
                         help="diff: the same artifact of another run (another clone or workspace)")
    lineage.add_argument("--domain", action="append", help="which: only this domain (repeatable; default: all)")
    export = commands.add_parser("export", help="run the export stage for one domain (its encoder in its field's "
                                                "format with a model card), export another init or elsewhere "
                                                "(--init, --out), or re-hash an export (`export verify DIR`)")
    export.add_argument("domain", help="a block name under `domains:` in params.yaml, or `verify`")
    export.add_argument("folder", nargs="?", type=Path, help="with `verify`: the export folder")
    export.add_argument("--init", default="ssl", help="ssl (the pretrained encoder, default) or generic")
    export.add_argument("--out", type=Path, help="where to write it (default: models/DOMAIN/export, and "
                                                 "export-generic or export-finetuned-FRACTION beside it)")
    export.add_argument("--finetuned", type=float, metavar="FRACTION",
                        help="the encoder as fine-tuned on this label fraction (with its head), not as pretrained")
    embed = commands.add_parser("embed", help="turn a folder of raw files into embeddings (Parquet), through the "
                                              "domain's readers, quarantine, pseudonyms and preprocessing")
    embed.add_argument("domain", help="a block name under `domains:` in params.yaml (its pretrained encoder), "
                                      "or an export folder (`ssl-pipeline export`)")
    embed.add_argument("folder", type=Path, help="the folder of raw files to embed")
    embed.add_argument("--out", type=Path, required=True, help="the Parquet file to write (quarantine beside it)")
    embed.add_argument("--init", default="ssl", help="ssl (the pretrained encoder, default) or generic")
    embed.add_argument("--batch-size", type=int, default=64, help="rows per forward pass (default 64)")
    embed.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when there is one)")
    return parser.parse_args(argv)


class Cancelled(KeyboardInterrupt):
    """A SIGTERM or SIGINT, raised in the main thread: the stage unwinds as on Ctrl-C (a subclass
    of KeyboardInterrupt, so libraries clean up as they do for it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Cancellation:
    """What the signal handlers of one `cancellable` block saw."""

    forward: bool
    signum: int | None = None  # the first cancel signal received
    armed: bool = True  # raises on the first signal (not once the block is ending)
    signalled: list[Any] = field(default_factory=list)  # psutil.Process: those SIGTERM was forwarded to
    sigchld: Any = None  # the SIGCHLD handler before the cancel (put back at the block's end)

    def handle(self, signum: int, frame: object) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
            if self.forward:
                # children now die on purpose: torch's DataLoader raises from its SIGCHLD handler when a
                # worker dies ("DataLoader worker ... is killed by signal"), even inside __del__, where
                # it prints a traceback ("Exception ignored in ...") after the one-line cancel
                self.sigchld = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if self.forward:  # every time: a process started while unwinding gets it too
            under = descendants()
            self.signalled.extend(under)
            send_signal(under, signal.SIGTERM)
        if first and self.armed:  # a second signal while unwinding: no second exception (no traceback)
            raise Cancelled(signum)


_cancellation: Cancellation | None = None  # the running `cancellable` block's


def cancelled() -> Cancellation | None:
    """The running `cancellable` block's state once a cancel signal arrived, else None."""
    return _cancellation if _cancellation is not None and _cancellation.signum is not None else None


def descendants() -> list[Any]:
    """Every process under this one (psutil.Process objects: a reused pid is never signalled)."""
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def send_signal(processes: list[Any], signum: int) -> None:
    import psutil

    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signum)


def stop_processes(processes: list[Any], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM `processes`, give them `grace` seconds to exit, SIGKILL the rest; returns when all are gone."""
    import psutil

    send_signal(processes, signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=grace)
    send_signal(alive, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=grace)


@contextlib.contextmanager
def cancellable(forward: bool = True, die_with_parent: bool = False) -> Iterator[Cancellation]:
    """SIGTERM and SIGINT raise `Cancelled` in the block (`forward`: after forwarding SIGTERM to
    every process under this one; at the end, what it reached and what is still under this process
    is stopped, `stop_processes`). `die_with_parent`: on Linux the kernel sends SIGTERM when the
    parent dies (for a parent that waits on us: not a shell we were left running under by nohup).
    The handlers before are back after the block; a signal ignored at the start (nohup) stays
    ignored. Outside the main thread (signals cannot be handled there) a plain block."""
    import threading

    from ssl_models.core.processes import on_process_exit, parent_death_signal, shell_wrapper_parent

    global _cancellation
    if threading.current_thread() is not threading.main_thread():
        yield Cancellation(forward)
        return
    state, outer = Cancellation(forward), _cancellation
    before = {s: signal.getsignal(s) for s in CANCEL_SIGNALS}
    parent = os.getppid()
    deathsig = parent_death_signal(signal.SIGTERM) if die_with_parent and sys.platform.startswith("linux") else None
    unwatch = None
    _cancellation = state
    try:
        for signum, handler in before.items():
            if handler is not signal.SIG_IGN:
                signal.signal(signum, state.handle)
        if deathsig is not None and os.getppid() != parent:  # it died before the kernel could be told
            os.kill(os.getpid(), signal.SIGTERM)
        if deathsig is not None and (starter := shell_wrapper_parent()) is not None:
            # `sh -c CMD` that did not exec us: the shell outlives its killed parent (DVC), so watch that one
            unwatch = on_process_exit(starter, signal.SIGTERM)
        yield state
    finally:
        state.armed = False
        if state.signum is not None and forward:
            stop_processes(state.signalled + descendants())
        for signum, handler in before.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if state.sigchld is not None:
            signal.signal(signal.SIGCHLD, state.sigchld)
        if deathsig is not None:
            parent_death_signal(deathsig)
        if unwatch is not None:
            unwatch()
        _cancellation = outer


class WorkspaceBusyError(Exception):
    """Another run of this domain holds its lock and did not let go in time."""


def _holder(lock_file: Path) -> dict[str, Any]:
    try:
        return json.loads(lock_file.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that has not said who it is"
    since = time.strftime("%H:%M:%S UTC", time.gmtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, running {holder.get('stage')} since {since}"


def _inherited(lock_file: Path) -> bool:
    """True in a process a lock holder started (torch.distributed.run's workers): the holder's
    pid is in our environment, is not us, is alive and is the one the lock file names."""
    from ssl_models.core.processes import process_alive

    path, _, pid = os.environ.get(LOCK_HOLDER_ENV, "").rpartition(":")
    if not pid.isdigit() or path != str(lock_file.resolve()) or int(pid) == os.getpid():
        return False
    return _holder(lock_file).get("pid") == int(pid) and process_alive(int(pid))


def _lock_timeout() -> float:
    setting = os.environ.get(LOCK_TIMEOUT_ENV)
    try:
        return DEFAULT_LOCK_TIMEOUT if setting in (None, "") else max(0.0, float(setting))
    except ValueError:
        from ssl_models.core.errors import PipelineError

        raise PipelineError(f"{LOCK_TIMEOUT_ENV}={setting!r} is not a number of seconds") from None


@contextlib.contextmanager
def domain_lock(lock_file: Path, stage: str, timeout: float | None = None) -> Iterator[bool]:
    """Hold the domain's lock while the block runs; yields False when a parent holds it for us."""
    if _inherited(lock_file) or os.environ.get("RANK", "0") != "0":
        # a worker of the holder's torchrun, or a non-zero rank of an outside torchrun world
        # (rank 0 holds the lock for the world; waiting here would deadlock the rendezvous)
        yield False
        return
    timeout = _lock_timeout() if timeout is None else timeout
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as handle:
        deadline, announced = time.monotonic() + timeout, None
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder, now = _holder(lock_file), time.monotonic()
                if now >= deadline:
                    raise WorkspaceBusyError(
                        f"{stage}: another run of this domain holds {lock_file} ({_describe(holder)}); "
                        f"waited {timeout:.0f} s. Let it finish, or set {LOCK_TIMEOUT_ENV} to wait longer") from None
                if announced is None or now - announced >= 60:
                    log.info("%s: waiting for %s, held by %s (up to %.0f s more; %s)", stage, lock_file,
                             _describe(holder), deadline - now, LOCK_TIMEOUT_ENV)
                    announced = now
                time.sleep(min(0.5, max(0.01, deadline - now)))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "stage": stage,
                                 "since": time.time()}))
        handle.flush()
        previous = os.environ.get(LOCK_HOLDER_ENV)
        os.environ[LOCK_HOLDER_ENV] = f"{lock_file.resolve()}:{os.getpid()}"
        try:
            yield True
        finally:
            cancel = cancelled()
            if cancel is not None and cancel.forward:  # held until nothing this run started works on
                stop_processes(cancel.signalled + descendants())
            if previous is None:
                os.environ.pop(LOCK_HOLDER_ENV, None)
            else:
                os.environ[LOCK_HOLDER_ENV] = previous
            handle.seek(0)
            handle.truncate()  # released (the kernel drops the flock when the file closes)


def check_inputs(stage: str, paths: Any) -> None:
    """Every artifact `stage` reads is complete (its lineage record is written last) and intact
    (each file's sha256 as recorded when it was written), else one line."""
    from ssl_models.core.errors import PipelineError
    from tasks.lineage import check_outputs_intact, record_path

    for artifact, maker in paths.inputs(stage).items():
        if not record_path(artifact).exists():
            state = "is incomplete" if artifact.exists() else "does not exist"
            raise PipelineError(f"{stage}@{paths.domain} reads {paths.relative(artifact)}, which {state}; "
                                f"run {maker}@{paths.domain} first (`dvc repro {stage}@{paths.domain}` "
                                "runs everything it needs)")
        check_outputs_intact(artifact, paths.relative(artifact), f"{maker}@{paths.domain}")


def run_stage(stage: str, domain_name: str, root: Path = Path("."),
              loaded: tuple[DomainConfig, Domain] | None = None) -> object:
    """Run `stage` under the domain's lock on the domain's block as `load_config` parsed it
    (`loaded`; parsed here when not given), as the CLI does."""
    from ssl_models.core.config import load_config
    from ssl_models.core.hashing import hash_cache
    from ssl_models.core.processes import collecting_less
    from tasks.io import clean_stale, private_outputs
    from tasks.lineage import check_raw_inputs_unchanged
    from tasks.paths import DomainPaths

    cfg, domain = loaded or load_config(domain_name, root / "params.yaml")
    paths = DomainPaths(domain_name, root)
    function = getattr(importlib.import_module(f"tasks.stages.{stage}"), stage)
    with domain_lock(paths.lock, f"{stage}@{domain_name}") as holder:
        if holder:  # what killed runs left behind: never taken for an output, never left to pile up
            for output in paths.outputs(stage) + paths.working_state(stage):
                for line in clean_stale(output.parent) + clean_stale(output, recursive=True):
                    log.info("%s@%s: %s", stage, domain_name, line)
        # the digests this machine took of files untouched since (ssl_models/core/hashing.HashCache): a
        # stage's start checks its inputs, and the raw corpus, without reading them again
        with hash_cache(paths.workspace / "hashes.sqlite"):
            check_inputs(stage, paths)
            if stage == "preprocess":
                check_raw_inputs_unchanged(paths.manifest, root, f"ingest@{domain_name}")
            # a data stage makes a few short-lived objects a record: the garbage collector runs less often
            collector = collecting_less() if stage in DATA_STAGES else contextlib.nullcontext()
            with private_outputs(domain.pseudonymises(cfg)), collector:  # private outputs: the owner's alone
                return function(cfg, domain, paths)


DATA_STAGES = ("ingest", "preprocess")


def _one_line(text: object) -> str:
    """`text` escaped (`printable`) and on one line: a CR in a file name shows as \\r, not a space."""
    return " ".join(printable(text).split())


def printable(text: object) -> str:
    """`text` made safe for a terminal: control and other non-printing characters (ESC, CR, bidi
    overrides, a file name's undecodable bytes) written as Python escapes (\\x1b, \\r, \\u202e,
    \\udcff); newlines and tabs kept. A file name holding "\\x1b[2J" cannot clear or recolour the
    screen, or hide the rest of a line."""
    text = str(text)
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def _say(text: object, stream: Any = None) -> None:
    """Print what comes from data or file names (lineage, mismatches, paths), escaped."""
    print(printable(text), file=stream or sys.stdout)


class _PrintableFormatter(logging.Formatter):
    """Log lines escaped as `printable` does: they name files too."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# an unexpected error with less than this free where the project lives reads as a full disk: torch.save
# on a full disk raises a RuntimeError ("PytorchStreamWriter failed writing file") with no errno behind it
DISK_NEARLY_FULL_BYTES = 64 * 2**20


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and the exceptions it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _disk_full(error: BaseException) -> OSError | None:
    """The out-of-space (or quota) OSError behind `error`, if that is what stopped the stage."""
    return next((e for e in _chain(error) if isinstance(e, OSError) and e.errno in DISK_FULL), None)


def _nearly_full(root: Path) -> bool:
    """Whether the disk holding the project has less than DISK_NEARLY_FULL_BYTES free."""
    try:
        return shutil.disk_usage(root).free < DISK_NEARLY_FULL_BYTES
    except OSError:
        return False


def _loaded_file(error: BaseException) -> str | None:
    """The file torch.load or safetensors was reading when `error` was raised (from its traceback)."""
    names = {("serialization.py", "load"): "f", ("torch.py", "load_file"): "filename"}
    tb, found = error.__traceback__, None
    while tb is not None:
        code = tb.tb_frame.f_code
        local = names.get((Path(code.co_filename).name, code.co_name))
        value = tb.tb_frame.f_locals.get(local) if local else None
        if isinstance(value, (str, os.PathLike)) or hasattr(value, "name"):
            found = str(getattr(value, "name", value))
        tb = tb.tb_next
    return found


def _unloadable_checkpoint(error: BaseException) -> str | None:
    """One line for a weights file that is not what it must be: a pickle torch.load(weights_only=True)
    refused (torch's own message advises weights_only=False, which would run the pickle's code: never
    repeated), or a file that is not safetensors; None for any other error."""
    import pickle

    from safetensors import SafetensorError

    for cause in _chain(error):
        if isinstance(cause, pickle.UnpicklingError):
            path = _loaded_file(cause) or "a checkpoint file"
            return (f"{path} is not a weights-only checkpoint; it was not loaded (give a .safetensors file, or "
                    "a torch state dict of tensors that torch.load(weights_only=True) reads)")
        if isinstance(cause, SafetensorError):
            path = _loaded_file(cause) or "a checkpoint file"
            return f"{path} is not a safetensors file ({_one_line(cause)}); it was not loaded"
    return None


def _report_failure(root: Path, name: str, line: str) -> None:
    """The one line also goes to `.ssl-pipeline/logs/<name>.error` (the flow names it in its log)."""
    with contextlib.suppress(OSError):
        from tasks.io import write_text

        folder = root / ".ssl-pipeline" / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / f"{name}.error", line + "\n")


def _pseudonymises(loaded: tuple[DomainConfig, Domain] | None) -> bool:
    """Whether the domain of the parsed block hides file names (True when that cannot be told,
    the block not parsed included: print less, not more)."""
    if loaded is None:
        return True
    try:
        cfg, domain = loaded
        return bool(domain.pseudonymises(cfg))
    except Exception:  # noqa: BLE001 - deciding what to print must not fail itself
        return True


def _log_traceback(root: Path, name: str) -> Path | None:
    """The traceback of the exception being handled, in an owner-only file; None when it cannot be written."""
    try:
        folder = root / ".ssl-pipeline" / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(traceback.format_exc())
        return path
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    from ssl_models.core.offline import apply_offline_env

    apply_offline_env()
    handler = logging.StreamHandler()
    handler.setFormatter(_PrintableFormatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    args = parse_args(sys.argv[1:] if argv is None else argv)
    name = "lineage" if args.command == "lineage" else f"{args.command}-{args.domain}"
    # the domain's block, parsed once: for the stage, and for what a failure may print
    loaded: list[tuple[DomainConfig, Domain]] = []
    # started by DVC (`dvc repro`, the flow): DVC waits on us, and dies at once on SIGTERM itself
    with cancellable(die_with_parent=DVC_STAGE_ENV in os.environ) as cancel:
        try:
            return run_command(args, loaded)
        except BaseException as error:
            cancel.armed = False  # a signal now is forwarded, not raised over the report of this one
            if not isinstance(error, (Exception, KeyboardInterrupt)) and cancel.signum is None:
                raise  # SystemExit and the like: not a failure to report
            line, code = failure_line(error, args, loaded[0] if loaded else None, cancel)
    line = printable(line)
    print(line, file=sys.stderr)
    _report_failure(args.root, name, line)
    return code


def run_command(args: argparse.Namespace, loaded: list[tuple[DomainConfig, Domain]]) -> int:
    """The command `args` names; its exit status. A stage's parsed block is appended to `loaded`."""
    if args.command == "lineage":
        if args.action == "diff":
            return run_lineage_diff(Path(args.artifact), args.other)
        return run_lineage(args.action, args.artifact, args.root, args.domain)
    if args.command == "export" and (args.domain == "verify" or args.folder or args.init != "ssl" or args.out
                                     or args.finetuned is not None):
        return run_export(args)
    if args.command == "embed":
        return run_embed(args)
    from ssl_models.core.config import load_config

    loaded.append(load_config(args.domain, args.root / "params.yaml"))
    if getattr(args, "new_salt", False):
        from tasks.sources import make_new_salt

        log.warning("%s", make_new_salt(*loaded[0]))
    run_stage(args.command, args.domain, args.root, loaded[0])
    return 0


def failure_line(error: BaseException, args: argparse.Namespace, loaded: tuple[DomainConfig, Domain] | None,
                 cancel: Cancellation) -> tuple[str, int]:
    """The one line a command that stopped on `error` prints, and its exit status."""
    from ssl_models.core.errors import PipelineError

    stage = "lineage" if args.command == "lineage" else f"{args.command}@{args.domain}"
    if cancel.signum is not None or isinstance(error, KeyboardInterrupt):
        # whatever the unwinding raised (a loader worker's SIGTERM, torchrun's exit): a cancel
        signum = cancel.signum or getattr(error, "signum", signal.SIGINT)
        return (f"cancelled: {stage} stopped on {signal.Signals(signum).name}, with every process it started; "
                "run it again to go on (pretrain resumes from its last checkpoint)"), 128 + signum
    if isinstance(error, PipelineError):
        return f"error: {_one_line(error)}", EXIT_BAD_INPUT
    if isinstance(error, WorkspaceBusyError):
        return f"busy: {_one_line(error)}", EXIT_BUSY
    private = args.command != "lineage" and _pseudonymises(loaded)
    full, unloadable = _disk_full(error), _unloadable_checkpoint(error)
    if full is not None or _nearly_full(args.root):  # the user's to fix (free space), not a fault a retry cures
        # the file written, unless the domain hides file names: then the project it is in
        place = args.root.resolve() if private or full is None or not full.filename else full.filename
        why = os.strerror(full.errno) if full is not None else (
            f"under {DISK_NEARLY_FULL_BYTES // 2**20} MiB free after {type(error).__name__}")
        return (f"error: {stage} stopped: the disk holding {place} is full ({why}); "
                "free space on it, or move data/ and models/ to a larger disk, and run again"), EXIT_BAD_INPUT
    if unloadable is not None:
        return f"error: {stage} stopped: {unloadable}", EXIT_BAD_INPUT
    name = "lineage" if args.command == "lineage" else f"{args.command}-{args.domain}"
    logged = _log_traceback(args.root, name)
    # a library's message may carry a file name: not printed when the domain hides them
    what = type(error).__name__ if private else f"{type(error).__name__}: {_one_line(error)}"
    where = f"; the traceback is in {logged}" if logged else ""
    return f"error: {stage} stopped on an unexpected {what}{where}", EXIT_ERROR


def run_export(args: argparse.Namespace) -> int:
    from ssl_models.core.errors import PipelineError
    from tasks import export
    from tasks.paths import DomainPaths

    if args.domain == "verify":
        if args.folder is None:
            raise PipelineError("export verify needs the export folder: ssl-pipeline export verify DIR")
        return _print_mismatches(export.verify(args.folder), f"in {args.folder}",
                                 f"{args.folder}: every file matches its manifest")
    if args.folder is not None:
        raise PipelineError(f"export {args.domain}: unexpected argument {str(args.folder)!r} (the folder goes in --out)")
    with domain_lock(DomainPaths(args.domain, args.root).lock, f"export@{args.domain}"):
        _say(export.export(args.root, args.domain, args.init, args.out, args.finetuned))
    return 0


def run_embed(args: argparse.Namespace) -> int:
    """`ssl-pipeline embed`: tasks/embed.py does the work; prints one line of what it wrote."""
    from tasks import embed

    summary = embed.embed(args.root, args.domain, args.folder, args.out, init=args.init,
                          batch_size=args.batch_size, device=args.device)
    _say(f"{summary['embedded']} embedded, {summary['quarantined']} quarantined: {summary['out']} "
         f"(quarantine: {summary['quarantine']})")
    return 0


def run_lineage_diff(a: Path, b: Path | None) -> int:
    """Print what differs between two runs' lineage; exit 0 when nothing does, 1 otherwise."""
    from ssl_models.core.errors import PipelineError
    from tasks import lineage

    if b is None:
        raise PipelineError("lineage diff needs two artifact folders: ssl-pipeline lineage diff A B")
    lines = lineage.diff(a, b)
    for line in lines:
        _say(line)
    _say(f"{len(lines)} difference(s) between {a} (A) and {b} (B)" if lines else f"{a} and {b}: the same lineage")
    return 1 if lines else 0


def run_lineage(action: str, artifact: str, root: Path, domains: list[str] | None = None) -> int:
    from tasks import lineage

    if action == "which":
        _say(lineage.which(artifact, root, domains))
        return 0
    if action == "show":
        _say(lineage.show(Path(artifact), root))
        return 0
    return _print_mismatches(lineage.verify(Path(artifact), root), f"in the lineage of {artifact}",
                             f"lineage of {artifact} verified: every file re-hashed and matched")


def _print_mismatches(problems: list[str], where: str, all_match: str) -> int:
    """A verify command's output: a MISMATCH line each and a count, or the all-match line; exit 1 or 0."""
    for problem in problems:
        _say(f"MISMATCH {problem}")
    _say(f"{len(problems)} mismatch(es) {where}" if problems else all_match)
    return 1 if problems else 0
