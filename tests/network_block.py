"""A network block for the tests: every process started with `offline_env`'s environment fails
(and records) each connection attempt to a non-local address.

The block is a `sitecustomize` module put first on PYTHONPATH: Python imports it at start-up in
every process (stage commands, loader and fine-tuning workers, DVC's daemons, a Prefect server, its
workers and their flow runs), before any library."""

from __future__ import annotations

from pathlib import Path

BLOCK = '''
import ipaddress, os, socket, subprocess

_LOG = os.environ["SSL_TEST_NETWORK_LOG"]
_HOOK = os.path.dirname(os.path.abspath(__file__))
_HOSTS = {"localhost", socket.gethostname()}
_popen_init = subprocess.Popen.__init__


def _popen_keeping_the_block(self, *args, **kwargs):
    """A child given an environment of its own (DVC's daemons reset PYTHONPATH) still loads this module."""
    env = kwargs.get("env")
    if env is not None:
        env = dict(env)
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join([_HOOK] + [p for p in parts if p != _HOOK])
        env["SSL_TEST_NETWORK_LOG"] = _LOG
        kwargs["env"] = env
    _popen_init(self, *args, **kwargs)


subprocess.Popen.__init__ = _popen_keeping_the_block


def _refuse(what):
    with open(_LOG, "a") as handle:
        handle.write(f"{os.getpid()} {what}\\n")
    raise OSError(f"network blocked by the test: {what}")


def _local(host):
    if host is None or host in _HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host).is_loopback
    except ValueError:
        return False


def _guard(method):
    def guarded(self, address, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _refuse(f"{method.__name__} {address!r}")
        return method(self, address, *args)
    return guarded


socket.socket.connect = _guard(socket.socket.connect)
socket.socket.connect_ex = _guard(socket.socket.connect_ex)
socket.socket.sendto = (lambda send: lambda self, data, *rest: (
    _refuse(f"sendto {rest[-1]!r}") if self.family in (socket.AF_INET, socket.AF_INET6)
    and not _local(rest[-1][0]) else send(self, data, *rest)))(socket.socket.sendto)
_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, *args, **kwargs):
    if not _local(host):
        _refuse(f"getaddrinfo {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = getaddrinfo
'''


def blocked_env(base: dict[str, str], folder: Path, repo: Path) -> tuple[dict[str, str], Path]:
    """`base` with the block on (its hook written under `folder`), and the file each attempt is written to."""
    hook = folder / "network-block"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(BLOCK)
    attempts = folder / "network-attempts.log"
    attempts.write_text("")
    env = {**base, "PYTHONPATH": f"{hook}:{repo}", "SSL_TEST_NETWORK_LOG": str(attempts)}
    for key in [k for k in env if k.endswith("_PROXY") or k.endswith("_proxy")]:
        del env[key]
    return env, attempts
