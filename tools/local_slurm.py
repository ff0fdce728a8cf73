#!/usr/bin/env python3
"""A real SLURM on localhost for the test suite and for trying the launcher on a laptop.

    python tools/local_slurm.py up   [--state DIR]   # install (root, apt) if missing, start daemons
    python tools/local_slurm.py down [--state DIR]   # stop the daemons started by `up`, by PID
    python tools/local_slurm.py env  [--state DIR]   # print `export SLURM_CONF=...` for a shell

Brings up munged, mariadb, slurmdbd, slurmctld and two slurmd (two simulated nodes, `gamci1` and
`gamci2`, on 127.0.0.1 with distinct ports) with the settings that work without systemd or
cgroups (proctrack/linuxproc, task/none). Two partitions: `debug` (default, preemptable, requeue,
30 s grace) and `urgent` (higher PriorityTier; a job there preempts `debug` jobs). Requeued jobs
restart after ~10 s (`cred_expire=10`) instead of 120 s. Every file lives under the state folder;
the daemons bind 127.0.0.1 only. `down` kills exactly the PIDs `up` recorded.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server"]
NODES = {"gamci1": 17011, "gamci2": 17012}
CTLD_PORT, DBD_PORT, DB_PORT = 17017, 17019, 17306
CLUSTER = "gamci"
DEFAULT_STATE = Path(os.environ.get("GAM_SLURM_STATE", f"/tmp/gam-pretrain-slurm-{os.getuid()}"))


class SlurmUpError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[local_slurm] {msg}", file=sys.stderr, flush=True)


def have_binaries() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sbatch", "sacct"))


def install() -> None:
    if have_binaries():
        return
    if os.geteuid() != 0:
        raise SlurmUpError("SLURM is not installed and this is not root: install " + " ".join(PACKAGES))
    log("installing " + " ".join(PACKAGES) + " with apt-get ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)


def slurm_conf(state: Path) -> str:
    host = socket.gethostname()
    nodes = "\n".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=2 "
                      f"RealMemory=4000 State=UNKNOWN" for name, port in NODES.items())
    return f"""\
ClusterName={CLUSTER}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={state}/munge/munge.socket,cred_expire=10
CredType=cred/munge
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobRequeue=1
EnforcePartLimits=ALL
MinJobAge=600
KillWait=10
InactiveLimit=0
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool-%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd-%n.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd-%n.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={DBD_PORT}
AccountingStoragePass={state}/munge/munge.socket
JobCompType=jobcomp/none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


def slurmdbd_conf(state: Path) -> str:
    return f"""\
AuthType=auth/munge
AuthInfo=socket={state}/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={DBD_PORT}
SlurmUser=root
PidFile={state}/slurmdbd.pid
LogFile={state}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={DB_PORT}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
"""


def _spawn(state: Path, name: str, cmd: list[str], env=None) -> subprocess.Popen:
    out = open(state / f"{name}.out", "ab")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    with open(state / "pids", "a") as f:
        f.write(f"{name} {proc.pid}\n")
    return proc


def _wait(what: str, check, timeout: float, state: Path, log_name: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and (proc is None or proc.poll() is None):
        if check():
            return
        time.sleep(0.3)
    tail = ""
    for f in sorted(state.glob(f"{log_name}*")):
        tail += f"\n--- {f.name} ---\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:])
    died = proc is not None and proc.poll() is not None
    raise SlurmUpError(f"{what} {'exited' if died else f'did not come up within {timeout:.0f}s'}{tail}")


def _ok(cmd: list[str], env) -> bool:
    return subprocess.run(cmd, env=env, capture_output=True).returncode == 0


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def client_env(state: Path) -> dict:
    return dict(os.environ, SLURM_CONF=str(state / "slurm.conf"))


def up(state: Path) -> dict:
    install()
    if (state / "pids").exists():
        down(state)
    if state.exists():
        shutil.rmtree(state)
    (state / "munge").mkdir(parents=True)
    (state / "ctld").mkdir()
    state.chmod(0o755)
    for name in NODES:
        (state / f"spool-{name}").mkdir()
    hosts = Path("/etc/hosts")
    if os.geteuid() == 0 and not all(n in hosts.read_text().split() for n in NODES):
        with open(hosts, "a") as f:
            f.write("127.0.0.1 " + " ".join(NODES) + "\n")
    started = time.time()

    # munge: private key and socket, run as root (--force: the files are ours, not the munge user's)
    key = state / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    (state / "munge").chmod(0o700)
    proc = _spawn(state, "munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                             f"--socket={state}/munge/munge.socket", f"--pid-file={state}/munge/munged.pid",
                             f"--log-file={state}/munge/munged.log", f"--seed-file={state}/munge/munged.seed"])
    _wait("munged", lambda: (state / "munge" / "munge.socket").exists(), 15, state, "munged", proc)
    (state / "munge").chmod(0o711)

    # mariadb for slurmdbd (sacct is how submitit learns job states)
    datadir = state / "mysql"
    subprocess.run(["mariadb-install-db", "--user=mysql", f"--datadir={datadir}", "--skip-test-db",
                    "--auth-root-authentication-method=socket"], check=True, capture_output=True)
    db_socket = datadir / "mysqld.sock"  # inside the folder the mysql user owns
    proc = _spawn(state, "mariadbd", ["mariadbd", "--no-defaults", "--user=mysql", f"--datadir={datadir}",
                                      "--bind-address=127.0.0.1", f"--port={DB_PORT}", f"--socket={db_socket}",
                                      f"--pid-file={datadir}/mysqld.pid", "--innodb-buffer-pool-size=32M",
                                      "--skip-log-bin", "--innodb-flush-log-at-trx-commit=0"])
    _wait("mariadb", lambda: db_socket.exists() and _port_open(DB_PORT), 60, state, "mariadbd", proc)
    sql = ("CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; "
           "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")
    subprocess.run(["mariadb", f"--socket={db_socket}", "-uroot", "-e", sql], check=True, capture_output=True)

    (state / "slurm.conf").write_text(slurm_conf(state))
    dbd_conf = state / "slurmdbd.conf"
    dbd_conf.write_text(slurmdbd_conf(state))
    dbd_conf.chmod(0o600)  # slurmdbd refuses a readable config (it holds the DB password)
    env = client_env(state)
    proc = _spawn(state, "slurmdbd", ["slurmdbd", "-D"], env=dict(env, SLURMDBD_CONF=str(dbd_conf)))
    _wait("slurmdbd", lambda: _port_open(DBD_PORT), 60, state, "slurmdbd", proc)
    add = ["sacctmgr", "-i", "add", "cluster", CLUSTER]
    _wait("sacctmgr add cluster", lambda: _ok(add, env) or _ok(["sacctmgr", "-n", "show", "cluster", CLUSTER], env),
          30, state, "slurmdbd")
    proc = _spawn(state, "slurmctld", ["slurmctld", "-D", "-c"], env=env)
    _wait("slurmctld", lambda: _ok(["scontrol", "ping"], env), 30, state, "slurmctld", proc)
    for name in NODES:
        _spawn(state, f"slurmd-{name}", ["slurmd", "-D", "-N", name], env=env)

    def nodes_idle() -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(n, "").rstrip("*") == "idle" for n in NODES)

    _wait("two idle slurmd nodes", nodes_idle, 60, state, "slurmd")
    log(f"SLURM up in {time.time() - started:.0f}s: nodes {', '.join(NODES)}; partitions debug (default), urgent; "
        f"export SLURM_CONF={state}/slurm.conf")
    return env


def down(state: Path) -> None:
    pid_file = state / "pids"
    if not pid_file.exists():
        return
    entries = [line.split() for line in pid_file.read_text().splitlines() if line.strip()]
    for name, pid in reversed(entries):  # slurmd, slurmctld, slurmdbd, mariadb, munged
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 15
    for name, pid in entries:
        while time.time() < deadline:
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    pid_file.unlink()
    log("SLURM daemons stopped")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "env"])
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help="folder for configs, logs and state")
    args = parser.parse_args()
    try:
        if args.action == "up":
            up(args.state)
        elif args.action == "down":
            down(args.state)
        print(f"export SLURM_CONF={args.state}/slurm.conf")
    except (SlurmUpError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None)
        print(f"local_slurm: {e}{(': ' + detail.decode(errors='replace')) if detail else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
