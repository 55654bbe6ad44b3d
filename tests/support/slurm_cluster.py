"""A throw-away single-node Slurm cluster for tests (Debian's slurm-wlm 22.05 and munge).

Everything the cluster writes (munge key and socket, slurm.conf, state, spool, logs, pid files)
lives in one scratch directory, and the daemons listen on ports picked free at start-up, so two
test sessions on one machine each get their own cluster and never touch /etc/slurm or /run/munge.
Clients find the cluster through ``SLURM_CONF``: run ``sbatch``/``squeue``/``snakemake`` with
``cluster.env``.

Only the daemons started here are ever stopped (by their process ids); the apt packages stay.

    cluster = start_cluster(Path("/tmp/scratch"))
    try:
        subprocess.run(["sbatch", "--wrap", "hostname"], env=cluster.env)
    finally:
        cluster.stop()
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

# The Debian packages that make up a one-node cluster (client tools, controller, node daemon, auth).
SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
REQUIRED_COMMANDS = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol")

PARTITION = "canopytest"
NODE_NAME = "canopynode"


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here; the message says why (tests skip with it)."""


def missing_commands() -> list[str]:
    """The Slurm/munge programs that are not on PATH (daemons live in /usr/sbin)."""
    search_path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [name for name in REQUIRED_COMMANDS if shutil.which(name, path=search_path) is None]


def _command(name: str) -> str:
    search_path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    found = shutil.which(name, path=search_path)
    if found is None:
        raise SlurmUnavailable(f"{name} is not installed")
    return found


def ensure_installed() -> None:
    """Install Debian's Slurm and munge when any of their programs is missing.

    Needs root and apt-get; otherwise raises SlurmUnavailable saying what is missing. The package
    lists are refreshed (once) only when the first install attempt fails, so a machine with fresh
    lists installs in a few seconds.
    """
    if not missing_commands():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"Slurm is not installed ({', '.join(missing_commands())} missing) and installing it "
            "needs root: run as root or `apt-get install slurmctld slurmd slurm-client munge`"
        )
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(
            f"Slurm is not installed ({', '.join(missing_commands())} missing) and there is no "
            "apt-get to install Debian's slurm-wlm packages"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Wait for another engineer's apt run instead of failing on the dpkg lock.
    install = [
        "apt-get", "install", "-y", "-qq", "-o", "DPkg::Lock::Timeout=300",
        "--no-install-recommends", *SLURM_PACKAGES,
    ]  # fmt: skip
    attempt = subprocess.run(install, env=env, capture_output=True, text=True)
    if attempt.returncode != 0:
        update = ["apt-get", "update", "-qq", "-o", "DPkg::Lock::Timeout=300"]
        subprocess.run(update, env=env, capture_output=True, text=True)
        attempt = subprocess.run(install, env=env, capture_output=True, text=True)
    if attempt.returncode != 0 or missing_commands():
        raise SlurmUnavailable(
            f"apt-get could not install {' '.join(SLURM_PACKAGES)} "
            f"(exit {attempt.returncode}): {attempt.stderr.strip()[-1500:]}"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _node_memory_mib() -> int:
    """MemTotal from /proc/meminfo in MiB, less a little so the node never looks over-committed."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(512, int(line.split()[1]) // 1024 - 256)
    raise SlurmUnavailable("/proc/meminfo has no MemTotal line")


@dataclass
class SlurmCluster:
    """A running single-node cluster: its scratch root, config and the daemons started for it."""

    root: Path
    conf: Path
    partition: str
    cpus: int
    memory_mib: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def bin_dir(self) -> Path:
        """Wrappers of the Slurm client commands that point them at this cluster's slurm.conf."""
        return self.root / "bin"

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF and the client wrappers first on PATH, for every Slurm
        client and for the snakemake that calls them."""
        path = f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        return dict(os.environ, SLURM_CONF=str(self.conf), PATH=path)

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster."""
        return subprocess.run(
            list(command), env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def node_state(self) -> str:
        """The node's state as sinfo reports it ('idle', 'mixed', 'down*', ...), '' when unknown."""
        result = self.run("sinfo", "--noheader", "--Node", "--format=%T")
        return result.stdout.strip() if result.returncode == 0 else ""

    def log(self, name: str) -> str:
        """The tail of one daemon's log file (for error messages)."""
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"

    def stop(self) -> None:
        """Cancel the cluster's jobs, then stop its daemons, newest first, by their process ids.

        Jobs first: a job's processes belong to slurmstepd, not to slurmd, and would outlive the
        daemons (for example after a test that timed out).
        """
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            self.run("scancel", f"--partition={self.partition}", "--full")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                active = self.run("squeue", "--noheader", "--states=PENDING,RUNNING,COMPLETING")
                if active.returncode != 0 or not active.stdout.strip():
                    break
                time.sleep(0.5)
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)
        self.processes.clear()


def write_slurm_conf(root: Path, cpus: int, memory_mib: int, munge_socket: Path) -> Path:
    """A minimal slurm.conf: one node with this machine's CPUs and memory, one default partition.

    No accounting (so `sacct` does not work: use `squeue` for job status), no cgroups (works in
    containers), and cons_tres so that CPUs and memory are what a job is scheduled by.
    """
    host = socket.gethostname().split(".")[0]
    lines = [
        "ClusterName=canopytest",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "SchedulerType=sched/backfill",
        # Finished jobs stay visible to squeue for an hour, longer than any test cluster lives:
        # the executor reads their final state, and the tests check every job's state after a run
        # that takes over five minutes on a busy machine (the default, 300 s, forgot the early
        # ones). 0 is no way out: squeue then shows no finished job at all and the executor waits.
        "MinJobAge=3600",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        "InactiveLimit=0",
        "KillWait=5",
        "Waittime=0",
        f"NodeName={NODE_NAME} NodeHostname={host} NodeAddr=127.0.0.1 "
        f"CPUs={cpus} RealMemory={memory_mib} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={NODE_NAME} Default=YES MaxTime=INFINITE State=UP",
    ]
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


CLIENT_COMMANDS = ("srun", "sbatch", "squeue", "scontrol", "sinfo", "scancel", "sacct", "salloc")


def write_client_wrappers(bin_dir: Path, conf: Path) -> None:
    """One wrapper per Slurm client command that sets SLURM_CONF before running the real one.

    SLURM_CONF alone is not enough: snakemake-executor-plugin-slurm-jobstep removes every
    SLURM_* variable before it calls `srun` inside a job, so a cluster whose slurm.conf is not in
    /etc/slurm is lost at that point. PATH survives, and with it these wrappers.
    """
    bin_dir.mkdir(exist_ok=True)
    for name in CLIENT_COMMANDS:
        real = shutil.which(name)
        if real is None:
            continue
        wrapper = bin_dir / name
        wrapper.write_text(f'#!/bin/sh\nSLURM_CONF="{conf}" exec "{real}" "$@"\n')
        wrapper.chmod(0o755)


def _start_munged(root: Path) -> tuple[subprocess.Popen, Path]:
    """A private munged with a fresh key; its socket path goes into slurm.conf's AuthInfo."""
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o700)
    key = munge_dir / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    socket_path = munge_dir / "munge.socket"
    command = [
        _command("munged"),
        "--foreground",
        "--force",  # munged refuses root otherwise; this private instance serves only this test
        f"--socket={socket_path}",
        f"--key-file={key}",
        f"--pid-file={munge_dir / 'munged.pid'}",
        f"--seed-file={munge_dir / 'munged.seed'}",
        f"--log-file={root / 'log' / 'munged.log'}",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 15
    while not socket_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            log = (root / "log" / "munged.log").read_text(errors="replace")[-2000:]
            process.kill() if process.poll() is None else None
            raise SlurmUnavailable(f"munged did not start (exit {process.poll()}):\n{log}")
        time.sleep(0.1)
    return process, socket_path


def start_cluster(root: Path, wait_seconds: float = 60) -> SlurmCluster:
    """Start munged, slurmctld and slurmd for a one-node cluster under ``root`` (a fresh directory).

    Returns once sinfo reports the node idle; on any failure the daemons already started are
    stopped and SlurmUnavailable carries the daemons' logs.
    """
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmd needs root (it runs jobs as their submitting user)")
    ensure_installed()
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "run", "log"):
        (root / sub).mkdir(exist_ok=True)
    cpus = os.cpu_count() or 1
    memory_mib = _node_memory_mib()
    cluster = SlurmCluster(
        root=root, conf=root / "slurm.conf", partition=PARTITION, cpus=cpus, memory_mib=memory_mib
    )
    try:
        munged, munge_socket = _start_munged(root)
        cluster.processes["munged"] = munged
        write_slurm_conf(root, cpus, memory_mib, munge_socket)
        write_client_wrappers(cluster.bin_dir, cluster.conf)
        daemon_output = subprocess.DEVNULL
        cluster.processes["slurmctld"] = subprocess.Popen(
            [_command("slurmctld"), "-D", "-i", "-f", str(cluster.conf)],
            env=cluster.env, stdout=daemon_output, stderr=daemon_output, start_new_session=True,
        )  # fmt: skip
        cluster.processes["slurmd"] = subprocess.Popen(
            [_command("slurmd"), "-D", "-N", NODE_NAME, "-f", str(cluster.conf)],
            env=cluster.env, stdout=daemon_output, stderr=daemon_output, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + wait_seconds
        state = ""
        while time.monotonic() < deadline:
            for name, process in cluster.processes.items():
                if process.poll() is not None:
                    raise SlurmUnavailable(
                        f"{name} exited with {process.returncode}:\n{cluster.log(name)}"
                    )
            state = cluster.node_state()
            if state == "idle":
                return cluster
            time.sleep(0.5)
        raise SlurmUnavailable(
            f"the Slurm node did not become idle within {wait_seconds:.0f} s (sinfo: {state!r})\n"
            f"slurmctld:\n{cluster.log('slurmctld')}\nslurmd:\n{cluster.log('slurmd')}"
        )
    except BaseException:
        cluster.stop()
        raise
