"""A real multi-node Ray cluster on this machine: a head and workers started with `ray start`.

Each node is its own `ray start --block` in its own session (raylet, object store, workers,
agents), with its own ports and a temp dir of its own, so a node can be lost as a machine is:
``kill_node`` sends SIGKILL to every process of that session at once. Workers carry a custom
resource (``{"accel_a": 1}``) standing in for a GPU type, as ``accelerator_type`` would on a GPU
cluster. Nodes share no table paths: tests keep tables on the moto S3 server (tests/s3_server.py).

The head's ``/tmp/ray/ray_current_cluster`` (which a later plain ``ray.init()`` would join) is
removed as soon as the head is up, and every node is killed when the block ends, even on failure.

Used by the multi-node tests (tests/test_cluster_nodes.py, through tests/cluster_nodes.py) and
by ``python -m bench faults`` (bench/node_loss.py).

Example::

    with ray_cluster_nodes(workers=[{"accel_a": 1}, {"accel_a": 1}]) as cluster:
        submit(cluster.jobs_address, ...)
        cluster.kill_node(cluster.workers[0])
        cluster.add_node({"accel_a": 1})
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY_BIN = Path(sys.executable).parent / "ray"
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")


def free_port() -> int:
    """Return a TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(eq=False)  # a node is itself: compared and hashed by identity
class Node:
    """One `ray start` process tree; ``node_id`` is Ray's hex id once the node registered."""

    name: str
    process: subprocess.Popen[bytes]
    resources: dict[str, float]
    temp_dir: str
    node_id: str = ""
    killed: bool = False


@dataclass
class Cluster:
    """The nodes of one cluster, where its GCS and jobs API listen, and what it may do to its nodes."""

    gcs_address: str
    jobs_address: str
    root: Path
    env: dict[str, str]
    nodes: list[Node] = field(default_factory=list)

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def workers(self) -> list[Node]:
        return [n for n in self.nodes[1:] if not n.killed]

    def alive_node_ids(self) -> set[str]:
        """Node ids the GCS reports alive (asked through the jobs API's state endpoint)."""
        import httpx

        reply = httpx.get(f"{self.jobs_address}/nodes?view=summary", timeout=10).json()
        summary = reply.get("data", {}).get("summary", [])
        return {n["raylet"]["nodeId"] for n in summary if n.get("raylet", {}).get("state") == "ALIVE"}

    def add_node(self, resources: dict[str, float] | None = None, num_cpus: int = 1, timeout: float = 90) -> Node:
        """Start one more worker node and return it once the cluster sees it alive."""
        before = self.alive_node_ids()
        name = f"worker{len(self.nodes)}"
        temp_dir = tempfile.mkdtemp(prefix=f"{name}-", dir=self.root)
        args = [f"--address={self.gcs_address}", f"--temp-dir={temp_dir}", *_node_ports()]
        process = _ray_start(args, num_cpus, resources or {}, self.env, Path(temp_dir) / "ray-start.log")
        node = Node(name, process, resources or {}, temp_dir)
        self.nodes.append(node)
        node.node_id = _wait_new_node(self, before, node, timeout)
        return node

    def kill_node(self, node: Node) -> int:
        """SIGKILL every process of the node (its `ray start`, raylet, object store, workers); return how many."""
        victims = _session_processes(node.process.pid)
        for process in victims:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.Error:
                continue
        node.process.wait(timeout=30)
        node.killed = True
        return len(victims)

    def node_of_pid(self, pid: int) -> Node | None:
        """Return the node whose session holds ``pid`` (e.g. a Serve replica's worker)."""
        try:
            sid = os.getsid(pid)
        except ProcessLookupError:
            return None
        return next((n for n in self.nodes if n.process.pid == sid and not n.killed), None)


def _node_ports() -> list[str]:
    """Every port a node opens, chosen free: several nodes share 127.0.0.1 here."""
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def _ray_start(
    args: list[str], num_cpus: int, resources: dict[str, float], env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    command = [
        str(RAY_BIN), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
        "--object-store-memory=200000000", "--disable-usage-stats", *args,
    ]
    if resources:
        command.append(f"--resources={json.dumps(resources)}")
    with log.open("wb") as out:  # `ray start` says why it did not start here
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid:
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def _wait_new_node(cluster: Cluster, before: set[str], node: Node, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            new = cluster.alive_node_ids() - before
        except Exception:  # the dashboard may not answer yet
            new = set()
        if len(new) == 1:
            return new.pop()
        if node.process.poll() is not None or time.monotonic() > deadline:
            said = (Path(node.temp_dir) / "ray-start.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"node {node.name} did not join (exit {node.process.poll()}): {said}")
        time.sleep(0.5)


def _forget_current_cluster(gcs_address: str) -> None:
    """Remove `ray start`'s auto-connect file if it names this cluster: no other test may join it."""
    try:
        if CURRENT_CLUSTER.read_text().strip() == gcs_address:
            CURRENT_CLUSTER.unlink()
    except FileNotFoundError:
        pass


@contextmanager
def ray_cluster_nodes(workers: list[dict[str, float]] | None = None, num_cpus: int = 1) -> Iterator[Cluster]:
    """Start a head and one worker node per entry of ``workers`` (its custom resources); kill them all at the end."""
    root = Path(tempfile.mkdtemp(prefix="lt-nodes-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    path = f"{RAY_BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PATH": path,
           "VIRTUAL_ENV": str(RAY_BIN.parent.parent), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    gcs_port, dashboard = free_port(), free_port()
    cluster = Cluster(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard}", root, env)
    try:
        head_dir = tempfile.mkdtemp(prefix="head-", dir=root)
        head = _ray_start(
            ["--head", f"--port={gcs_port}", f"--temp-dir={head_dir}", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
             *_node_ports()],
            num_cpus, {}, env, Path(head_dir) / "ray-start.log",
        )
        cluster.nodes.append(Node("head", head, {}, head_dir))
        cluster.head.node_id = _wait_new_node(cluster, set(), cluster.head, 90)
        _forget_current_cluster(cluster.gcs_address)
        for resources in workers or []:
            cluster.add_node(resources, num_cpus)
        yield cluster
    finally:
        for node in reversed(cluster.nodes):
            if not node.killed:
                cluster.kill_node(node)
        _forget_current_cluster(cluster.gcs_address)
        shutil.rmtree(root, ignore_errors=True)  # the nodes' sessions and logs


def labeler_config(app: str, http_port: int, *, latency_ms: float, autoscaling: dict | None = None) -> dict:
    """A `serve deploy` config shaped like configs/serve: a random-backend labeler placed by ``accel_a``.

    ``latency_ms`` per image stands in for a model's inference time (the replica sleeps).
    """
    deployment: dict = {
        "name": "Labeler",
        "max_ongoing_requests": 8,
        "max_queued_requests": 256,
        "ray_actor_options": {"num_cpus": 0.25, "resources": {"accel_a": 1}},
    }
    deployment.update({"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": 1})
    backend = {"kind": "random", "model": "random", "batch_size": 8, "options": {"latency_ms": latency_ms}}
    return {
        "proxy_location": "HeadOnly",  # every node is 127.0.0.1 here: one HTTP proxy, on the head
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [
            {
                "name": app,
                "route_prefix": "/",
                "import_path": "serve_apps.deploy:app",
                "args": {"task": "digits", "backend": backend, "max_batch_size": 8},
                "deployments": [deployment],
            }
        ],
    }


def worker_node_running(cluster: Cluster, title: str) -> Node | None:
    """A live worker node on which a process whose command line holds ``title`` runs right now (a Ray
    worker shows the task it runs, e.g. ``validate_and_write``)."""
    for process in psutil.process_iter(["cmdline"]):
        try:
            if title in " ".join(process.info["cmdline"] or []):
                node = cluster.node_of_pid(process.pid)
                if node in cluster.workers:
                    return node
        except psutil.Error:
            continue
    return None


def replica_pids(app: str) -> list[int]:
    """Pids of the Serve replicas of ``app`` on this machine (any node)."""
    out = subprocess.run(["pgrep", "-f", f"ray::ServeReplica:{app}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; raise TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.2)


def serve_deploy(cluster: Cluster, config: dict, workdir: Path) -> None:
    """`serve deploy` ``config`` to the cluster (replaces the app) and wait for exactly one replica."""
    path = workdir / "serve.json"  # JSON is YAML
    path.write_text(json.dumps(config))
    serve = RAY_BIN.parent / "serve"
    subprocess.run(
        [str(serve), "deploy", str(path), "--address", cluster.jobs_address],
        check=True, env=cluster.env, capture_output=True, timeout=120,
    )
    app = config["applications"][0]["name"]
    wait_for(lambda: len(replica_pids(app)) == 1, 120, "one labeler replica")


def submit_label(
    cluster: Cluster, uri: str, app: str, storage_options: dict[str, str], log: Path, *extra: str
) -> subprocess.Popen[str]:
    """`lancetag submit --wait --json -- label URI --app APP ... EXTRA` to the cluster; output to ``log``.

    Commits every 32 rows (or 2 s), two workers at once, 8 images per request: a run of a few
    hundred rows makes many versions, so a kill lands between commits.
    """
    args = ["label", uri, "--task", "digits", "--app", app, "--concurrency", "2", "--batch-size", "8",
            "--commit-rows", "32", "--commit-seconds", "2", "--json", *extra]
    return submit(cluster, args, log, {"LANCETAG_STORAGE_OPTIONS": json.dumps(storage_options)})


def submit(cluster: Cluster, args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`lancetag submit --wait --json -- ARGS` to the cluster, passing on every variable of ``env``; output to ``log``."""
    env = env or {}
    passed = [flag for name in env for flag in ("--env", name)]
    command = [str(RAY_BIN.parent / "lancetag"), "submit", "--address", cluster.jobs_address, *passed, "--wait", "--json",
               "--", *args]
    return subprocess.Popen(command, env={**cluster.env, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def job_output(log: Path, key: str) -> dict | None:
    """The job's own ``--json`` document in a ``submit`` log: the last JSON line that has ``key``."""
    found = None
    for line in log.read_text().splitlines():
        if line.startswith("{") and f'"{key}"' in line:
            try:
                found = json.loads(line)
            except ValueError:  # a log line that only looks like JSON
                continue
    return found


def submitted_result(process: subprocess.Popen[str], log: Path, timeout: float = 300) -> dict:
    """Wait for a ``submit_label`` process; return its last JSON line (job_id, status) and its exit code."""
    process.wait(timeout=timeout)
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"lancetag submit printed no result: {log.read_text()[-3000:]}")
    return {**json.loads(lines[-1]), "returncode": process.returncode}
