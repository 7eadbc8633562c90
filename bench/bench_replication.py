#!/usr/bin/env python3
"""Replication benchmark for drtool, against its own two-site lab.

    python bench/bench_replication.py [--size 2G] [--data 1G] [--rounds 3]
        [--json-out bench/results/replication.json] [--quick]

Measures, on one lab (site-a: the VM, site-b: the DR host; see bench/README.md):

1. initial sync: `drtool protect VM --json` of a VM whose one qcow2 disk
   (--size virtual) holds --data bytes of data at its start and is
   unallocated after; wall clock, drtool's own seconds, and the mirror's copy
   phase (JOB_STATUS_CHANGE created -> ready, seen on the lab's monitor);
2. the reference: `qemu-img convert -n` of the same image, from site-a's
   namespace, into a qemu-storage-daemon NBD export on site-b (fresh qcow2,
   TLS-PSK, writethrough=on: as drtool's target) through a socat relay with
   drtool's link options (and, with --reference-path both, also straight over
   TCP); reference and drtool alternate, medians are reported;
3. bytes the DR target received during the initial sync (ss on the NBD port
   in site-b's namespace, and the site link's rx counter) vs the data size,
   and the replica's allocation;
4. guest write throughput through the virtio device (HMP qemu-io on the
   device backend, as LabVm.guest_write does) unprotected, protected async
   and protected sync.

Needs root (the lab makes network namespaces), QEMU, socat, sshd. Everything it
starts is torn down at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from drtool.lab import Lab, LabVm  # noqa: E402
from drtool.mechanics.link import CONNECT_TIMEOUT, LINK_TIMEOUT, SOL_TCP, TCP_USER_TIMEOUT  # noqa: E402
from drtool.mechanics.replication import TLS_PRIORITY  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SEED_PATTERN = 0x5A
PSK_USER = "drtool"
REF_PORT = 10990  # in drtool's NBD port range's top, away from what protect picks (lowest free from 10809)
DEFAULT_JSON = REPO / "bench" / "results" / "replication.json"
QUIET = 0.35  # as drtool.replication.QUIET: "nothing left to copy" must hold this long


# --------------------------------------------------------------------------- small helpers


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)")
    mult = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def rate(n: float) -> str:
    return f"{n / MiB:.1f} MiB/s"


def median(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(argv: Sequence[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def drtool(config: Path, *args: str, timeout: float = 1800) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run drtool as a user would (a subprocess); return its result and wall-clock seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "drtool", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          cwd=REPO)
    return proc, time.perf_counter() - t0


def drtool_ok(config: Path, *args: str, timeout: float = 1800) -> tuple[subprocess.CompletedProcess[str], float]:
    proc, secs = drtool(config, *args, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"drtool {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc, secs


def image_allocation(image: Path) -> dict[str, int]:
    """actual-size (file blocks) and the data/zero extents of a qcow2 (read with -U: it may be open)."""
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(image)]).stdout)
    extents = json.loads(run(["qemu-img", "map", "-U", "--output=json", str(image)]).stdout)
    data = sum(e["length"] for e in extents if e.get("data"))
    zero_alloc = sum(e["length"] for e in extents if not e.get("data") and e.get("zero") and "offset" in e)
    return {"actual_size": int(info.get("actual-size", 0)), "virtual_size": int(info["virtual-size"]),
            "data_extents": data, "zero_extents_allocated": zero_alloc}


# --------------------------------------------------------------------------- measurements below QEMU


def site_link_rx(lab: Lab, host: str) -> int:
    """rx bytes of `host`'s site-link interfaces (only NBD crosses them: drtool's SSH uses management links)."""
    out = lab.exec(host, ["ip", "-j", "-s", "link", "show"]).stdout
    total = 0
    for link in json.loads(out):
        if re.search(r"l\d+-\d+$", link.get("ifname", "")):
            total += int(link["stats64"]["rx"]["bytes"])
    return total


def nbd_bytes_received(lab: Lab, host: str, port: int) -> dict[str, int]:
    """bytes_received per established connection to `port` in `host`'s namespace (ss -tin), as the tests do."""
    out = lab.exec(host, ["ss", "-Htin", "state", "established", f"( sport = :{port} )"]).stdout
    conns: dict[str, int] = {}
    current = None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            current = " ".join(line.split()[-2:])
        else:
            m = re.search(r"bytes_received:(\d+)", line)
            if m and current:
                conns[current] = int(m.group(1))
    return conns


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class JobWatcher:
    """Timestamps of a VM's block-job events, seen on the lab's own QMP monitor (not drtool's).

    While it runs it holds the lab monitor: do not call vm.qmp() meanwhile.
    """

    def __init__(self, vm: LabVm) -> None:
        self.vm = vm
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def __enter__(self) -> JobWatcher:
        self._thread.start()
        if not self._ready.wait(15) or self._error:
            raise RuntimeError(f"cannot watch {self.vm.name}'s jobs: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    def _main(self) -> None:
        try:
            asyncio.run(self._watch())
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
            self._ready.set()

    async def _watch(self) -> None:
        from qemu.qmp import QMPClient

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        client = QMPClient("bench-watch")
        await client.connect(str(self.vm.lab_qmp_socket))
        try:
            with client.listener(("JOB_STATUS_CHANGE", "BLOCK_JOB_READY")) as listener:
                self._ready.set()
                stop = asyncio.ensure_future(self._stop.wait())
                while True:
                    get = asyncio.ensure_future(listener.get())
                    done, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                    if get in done:
                        ev = get.result()
                        self.events.append((time.monotonic(), ev["event"], dict(ev.get("data", {}))))
                    if stop in done:
                        get.cancel()
                        break
        finally:
            try:
                await client.disconnect()
            except Exception:  # noqa: BLE001
                pass

    def first(self, job: str, status: str) -> float | None:
        for t, name, data in self.events:
            if name == "JOB_STATUS_CHANGE" and data.get("id") == job and data.get("status") == status:
                return t
        return None


# --------------------------------------------------------------------------- the reference


class Reference:
    """qemu-img convert into a qemu-storage-daemon on site-b, as drtool's target is configured."""

    def __init__(self, lab: Lab, size: int, psk_line: str, *, tls: bool = True, writethrough: bool = True) -> None:
        self.lab = lab
        self.tls = tls  # both True: as drtool's target (the benchmark's reference); False only for experiments
        self.writethrough = writethrough
        self.priority: str | None = None  # GnuTLS priority for qemu-img's client credentials (experiments)
        self.size = size
        self.addr = lab.peer_address("site-a", "site-b")
        self.dst_dir = lab.host_dir("site-b") / "bench-ref"
        self.src_dir = lab.host_dir("site-a") / "bench-ref"
        self.image = self.dst_dir / "ref0.qcow2"
        self.socket = self.src_dir / "ref.nbd.sock"
        self.psk_line = psk_line
        self.qsd: subprocess.Popen[Any] | None = None
        self.relay: subprocess.Popen[Any] | None = None

    def _psk(self, d: Path) -> Path:
        tls = d / "tls"
        tls.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = tls / "keys.psk"
        key.write_text(self.psk_line)
        key.chmod(0o600)
        return tls

    def start(self) -> None:
        self.dst_dir.mkdir(parents=True, exist_ok=True)
        self.src_dir.mkdir(parents=True, exist_ok=True)
        self.image.unlink(missing_ok=True)
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.image), str(self.size)])
        tls = self._psk(self.dst_dir)
        server: dict[str, Any] = {"addr": {"type": "inet", "host": self.addr, "port": str(REF_PORT)}}
        argv = ["qemu-storage-daemon"]
        if self.tls:
            argv += ["--object", json.dumps({"qom-type": "tls-creds-psk", "id": "tls0", "endpoint": "server",
                                             "dir": str(tls)})]
            server["tls-creds"] = "tls0"
        argv += [
            "--blockdev", json.dumps({"driver": "file", "node-name": "file0", "filename": str(self.image)}),
            "--blockdev", json.dumps({"driver": "qcow2", "node-name": "ref0", "file": "file0"}),
            "--nbd-server", json.dumps(server),
            "--export", json.dumps({"type": "nbd", "id": "e0", "node-name": "ref0", "name": "ref0",
                                    "writable": True, "writethrough": self.writethrough}),
        ]  # fmt: skip
        self.qsd = self.lab.start_raw_process("site-b", argv)
        deadline = time.monotonic() + 20
        while not self.lab.can_connect("site-a", self.addr, REF_PORT, timeout=1):
            if self.qsd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("reference qemu-storage-daemon did not start (see the lab's run/site-b/logs)")
            time.sleep(0.1)
        self.socket.unlink(missing_ok=True)
        # drtool/link.py's socat_argv, with the same TCP options
        self.relay = self.lab.start_raw_process("site-a", [
            "socat",
            f"UNIX-LISTEN:{self.socket},fork,unlink-early,mode=600",
            f"TCP:{self.addr}:{REF_PORT},connect-timeout={CONNECT_TIMEOUT},nodelay,keepalive,keepidle=5,"
            f"keepintvl=2,keepcnt=3,setsockopt-int={SOL_TCP}:{TCP_USER_TIMEOUT}:{LINK_TIMEOUT * 1000}",
        ])  # fmt: skip
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.relay.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("reference socat relay did not start")
            time.sleep(0.05)

    def convert(self, source: Path, path: str, *, debug_tls: bool = False) -> tuple[float, str]:
        """qemu-img convert -n from site-a's namespace; `path` is 'relay' (socat UNIX->TCP) or 'direct' (TCP).

        Returns the wall-clock seconds and qemu-img's stderr (GnuTLS's handshake log with debug_tls).
        """
        tls = self._psk(self.src_dir)
        if path == "relay":
            server = f"server.type=unix,server.path={self.socket}"
        else:
            server = f"server.type=inet,server.host={self.addr},server.port={REF_PORT}"
        argv = ["env", "GNUTLS_DEBUG_LEVEL=4"] if debug_tls else []
        argv += ["qemu-img", "convert", "-n", "-U", "-f", "qcow2"]
        target = f"driver=nbd,{server},export=ref0"
        if self.tls:
            prio = f",priority={self.priority}" if self.priority else ""
            argv += ["--object", f"tls-creds-psk,id=tls0,endpoint=client,dir={tls},username={PSK_USER}{prio}"]
            target += ",tls-creds=tls0"
        argv += ["--target-image-opts", str(source), target]
        t0 = time.perf_counter()
        proc = self.lab.exec("site-a", argv, timeout=1800)
        secs = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"qemu-img convert exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        return secs, proc.stderr

    def probe_cipher(self, scratch: Path) -> str:
        """The TLS cipher suite GnuTLS negotiates on this path (a 1 MiB convert with GnuTLS's debug log)."""
        scratch.unlink(missing_ok=True)
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(scratch), "1M"])
        run(["qemu-io", "-f", "qcow2", str(scratch), "-c", "write -q -P 1 0 1M"])
        self.start()
        try:
            _, err = self.convert(scratch, "relay", debug_tls=True)
        finally:
            self.stop()
            scratch.unlink(missing_ok=True)
        suites = re.findall(r"Selected cipher suite: (\S+)", err)
        versions = re.findall(r"Negotiated version: (\S+)", err)
        tls_names = {"3.4": "TLS1.3", "3.3": "TLS1.2"}
        if not suites:
            return "?"
        return f"{suites[-1]}" + (f" ({tls_names.get(versions[-1], versions[-1])})" if versions else "")

    def stop(self) -> None:
        for proc in (self.relay, self.qsd):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.relay = self.qsd = None


# --------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lab: Lab | None = None
        self.protected: list[Path] = []  # configs of VMs to unprotect at cleanup
        self.references: list[Reference] = []
        self.results: dict[str, Any] = {}

    # ---------------------------------------------------------------- setup

    def vm_config(self, vm: LabVm, mode: str = "async") -> Path:
        assert self.lab is not None
        return self.lab.write_config(self.lab.dir / f"{vm.name}.toml", {vm.name: {"dr_host": "site-b", "mode": mode}})

    def protect(self, config: Path, vm: str) -> tuple[dict[str, Any], float]:
        self.protected.append(config)
        proc, secs = drtool_ok(config, "protect", vm, "--json")
        return json.loads(proc.stdout), secs

    def unprotect(self, config: Path, vm: str) -> None:
        drtool_ok(config, "unprotect", vm, "--delete-replicas", timeout=300)
        if config in self.protected:
            self.protected.remove(config)

    def seeded_vm(self, name: str) -> LabVm:
        """A VM on site-a whose vd0 (--size) holds --data bytes of SEED_PATTERN from offset 0, the rest unallocated.

        The image is written with qemu-io while no QEMU has it open: seeding, not replication.
        """
        assert self.lab is not None
        size, data = self.args.size, self.args.data
        vm = self.lab.add_vm(name, "site-a", {"vd0": str(size)}, start=False)
        vm.stop()
        chunk = 64 * MiB
        cmds: list[str] = []
        for off in range(0, data, chunk):
            cmds += ["-c", f"write -q -P 0x{SEED_PATTERN:02x} {off} {min(chunk, data - off)}"]
        t0 = time.perf_counter()
        run(["qemu-io", "-f", "qcow2", str(vm.disks["vd0"]), *cmds], timeout=1800)
        log(f"seeded {human(data)} into {vm.disks['vd0'].name} in {time.perf_counter() - t0:.1f} s")
        vm.relaunch(start=True)
        self.note_accel(vm)
        return vm

    def note_accel(self, vm: LabVm) -> None:
        env = self.results["environment"]
        if env.get("accel") is None:
            env["accel"] = "kvm" if vm.qmp("query-kvm").get("enabled") else "tcg"

    # ---------------------------------------------------------------- 1-3: initial sync vs reference

    def drtool_round(self, vm: LabVm, config: Path) -> dict[str, Any]:
        assert self.lab is not None
        rx0 = site_link_rx(self.lab, "site-b")
        cpu0 = cpu_seconds(vm.pid)
        with JobWatcher(vm) as watcher:
            result, wall = self.protect(config, vm.name)
        cpu1 = cpu_seconds(vm.pid)
        rx1 = site_link_rx(self.lab, "site-b")
        replica_dir = self.lab.host_dir("site-b") / "replicas" / vm.name
        manifest = json.loads((replica_dir / "manifest.json").read_text())
        try:
            target_cpu = cpu_seconds(int((replica_dir / "target.pid").read_text().strip()))
        except (OSError, ValueError):
            target_cpu = None
        conns = nbd_bytes_received(self.lab, "site-b", manifest["nbd_port"])
        created = watcher.first("drtool-mirror0", "created")
        ready = watcher.first("drtool-mirror0", "ready")
        replica = Path(manifest["disks"][0]["replica_image"])
        alloc = image_allocation(replica)
        self.unprotect(config, vm.name)
        row = {
            "wall_seconds": wall,
            "reported_seconds": float(result["seconds"]),
            "copy_seconds": (ready - created) if created and ready else None,
            "setup_seconds": None,
            "nbd_bytes_received": sum(conns.values()),
            "nbd_connections": len(conns),
            "site_link_rx_bytes": rx1 - rx0,
            "replica": alloc,
            "bytes_in_use_reported": result.get("bytes_in_use"),
            # CPU seconds during protect: the source QEMU (mirror + NBD client + TLS, one main loop) and
            # the DR target's qemu-storage-daemon since it started (NBD server + TLS + qcow2 + fdatasync)
            "source_qemu_cpu_seconds": (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None,
            "target_qsd_cpu_seconds": target_cpu,
        }
        if row["copy_seconds"] is not None:
            row["setup_seconds"] = wall - row["copy_seconds"]
        return row

    def reference_round(self, ref: Reference, source: Path, path: str) -> dict[str, Any]:
        assert self.lab is not None
        ref.start()
        try:
            rx0 = site_link_rx(self.lab, "site-b")
            secs, _ = ref.convert(source, path)
            rx1 = site_link_rx(self.lab, "site-b")
        finally:
            ref.stop()
        alloc = image_allocation(ref.image)
        ref.image.unlink(missing_ok=True)
        return {"path": path, "wall_seconds": secs, "site_link_rx_bytes": rx1 - rx0, "replica": alloc}

    def initial_sync(self) -> None:
        assert self.lab is not None
        args = self.args
        vm = self.seeded_vm("seed")
        config = self.vm_config(vm)
        ref = Reference(self.lab, args.size, f"{PSK_USER}:{os.urandom(32).hex()}\n")
        self.references.append(ref)
        ref.priority = args.reference_tls_priority
        cipher = ref.probe_cipher(self.lab.dir / "probe.qcow2")
        log(f"reference TLS: {cipher} (priority {args.reference_tls_priority or 'QEMU default'})")
        paths = ["relay", "direct"] if args.reference_path == "both" else [args.reference_path]
        drtool_rows: list[dict[str, Any]] = []
        ref_rows: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
        for r in range(args.rounds):
            order: list[Callable[[], None]] = []

            def do_drtool() -> None:
                row = self.drtool_round(vm, config)
                drtool_rows.append(row)
                log(f"round {r + 1}: drtool protect {row['wall_seconds']:.1f} s wall "
                    f"({row['reported_seconds']:.1f} s reported, copy phase "
                    f"{row['copy_seconds'] or float('nan'):.1f} s), "
                    f"NBD rx {human(row['nbd_bytes_received'])}")

            def do_ref(p: str) -> None:
                row = self.reference_round(ref, vm.disks["vd0"], p)
                ref_rows[p].append(row)
                log(f"round {r + 1}: qemu-img convert ({p}) {row['wall_seconds']:.1f} s, "
                    f"link rx {human(row['site_link_rx_bytes'])}")

            refs = [lambda p=p: do_ref(p) for p in paths]
            order = [*refs, do_drtool] if r % 2 == 0 else [do_drtool, *refs]
            for step in order:
                step()
        vm.stop()

        data, size = args.data, args.size
        d_wall = median([x["wall_seconds"] for x in drtool_rows])
        d_rep = median([x["reported_seconds"] for x in drtool_rows])
        d_copy = median([x["copy_seconds"] for x in drtool_rows])
        out: dict[str, Any] = {
            "virtual_size": size, "data_bytes": data, "rounds": args.rounds,
            "reference_tls_priority": args.reference_tls_priority, "reference_tls_cipher": cipher,
            "drtool": {
                "rounds": drtool_rows,
                "median_wall_seconds": d_wall, "median_reported_seconds": d_rep, "median_copy_seconds": d_copy,
                "data_rate_wall": data / d_wall, "virtual_rate_wall": size / d_wall,
                "data_rate_reported": data / d_rep,
                "data_rate_copy": data / d_copy if d_copy else None,
                "virtual_rate_copy": size / d_copy if d_copy else None,
                "median_source_qemu_cpu_seconds": median([x["source_qemu_cpu_seconds"] for x in drtool_rows]),
                "median_target_qsd_cpu_seconds": median([x["target_qsd_cpu_seconds"] for x in drtool_rows]),
            },
            "reference": {},
        }  # fmt: skip
        for p in paths:
            w = median([x["wall_seconds"] for x in ref_rows[p]])
            out["reference"][p] = {
                "rounds": ref_rows[p], "median_wall_seconds": w,
                "data_rate": data / w, "virtual_rate": size / w,
                "ratio_drtool_wall": (data / d_wall) / (data / w),
                "ratio_drtool_reported": (data / d_rep) / (data / w),
                "ratio_drtool_copy": ((data / d_copy) / (data / w)) if d_copy else None,
                "median_site_link_rx_bytes": median([x["site_link_rx_bytes"] for x in ref_rows[p]]),
            }  # fmt: skip
        nbd_rx = median([x["nbd_bytes_received"] for x in drtool_rows])
        out["bytes_sent"] = {
            "median_nbd_bytes_received": nbd_rx,
            "median_site_link_rx_bytes": median([x["site_link_rx_bytes"] for x in drtool_rows]),
            "ratio_to_data": nbd_rx / data,
            "ratio_to_virtual": nbd_rx / size,
            "replica": drtool_rows[-1]["replica"],
        }
        self.results["initial_sync"] = out

    # ---------------------------------------------------------------- 4: guest writes

    def wait_drained(self, vm: LabVm, timeout: float = 600) -> float:
        """Seconds until the VM's drtool job has nothing left to copy (ready, offset == len, held QUIET s)."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        quiet_since = None
        while time.monotonic() < deadline:
            jobs = [j for j in vm.qmp("query-block-jobs") if j["device"].startswith("drtool-mirror")]
            if jobs and all(j["ready"] and j["offset"] == j["len"] and j["io-status"] == "ok" for j in jobs):
                quiet_since = quiet_since or time.perf_counter()
                if time.perf_counter() - quiet_since >= QUIET:
                    return quiet_since - t0
            else:
                quiet_since = None
            time.sleep(0.05)
        raise RuntimeError(f"{vm.name}: replication did not catch up in {timeout} s")

    def guest_writes(self) -> None:
        assert self.lab is not None
        args = self.args
        total, chunk, rounds = args.write_size, args.write_chunk, args.rounds
        disk = max(GiB, -(-rounds * total // GiB) * GiB)
        setups = ("unprotected", "async", "sync")
        vms: dict[str, LabVm] = {}
        configs: dict[str, Path] = {}
        for s in setups:
            vm = self.lab.add_vm(f"gw-{s}", "site-a", {"vd0": str(disk)})
            vms[s] = vm
            self.note_accel(vm)
            if s != "unprotected":
                configs[s] = self.vm_config(vm, mode=s)
                self.protect(configs[s], vm.name)
                self.wait_drained(vm)
        rows: dict[str, list[dict[str, float]]] = {s: [] for s in setups}
        for r in range(rounds):
            order = setups[r % 3:] + setups[:r % 3]
            for s in order:
                vm = vms[s]
                base = r * total
                pattern = 0x10 + 0x10 * setups.index(s) + r
                t0 = time.perf_counter()
                for off in range(0, total, chunk):
                    vm.guest_write("vd0", base + off, min(chunk, total - off), pattern)
                secs = time.perf_counter() - t0
                row = {"seconds": secs, "mib_per_s": total / MiB / secs}
                if s == "async":
                    row["drain_seconds"] = self.wait_drained(vm)
                elif s == "sync":
                    self.wait_drained(vm)
                rows[s].append(row)
                log(f"round {r + 1}: guest writes {s}: {human(total)} in {secs:.2f} s = {row['mib_per_s']:.1f} MiB/s"
                    + (f", caught up {row['drain_seconds']:.2f} s later" if "drain_seconds" in row else ""))
        for s, config in configs.items():
            self.unprotect(config, vms[s].name)
        for vm in vms.values():
            vm.stop()
        med = {s: median([x["mib_per_s"] for x in rows[s]]) for s in setups}
        self.results["guest_writes"] = {
            "bytes_per_round": total, "chunk": chunk, "rounds": rounds, "disk_size": disk,
            "setups": {s: {"rounds": rows[s], "median_mib_per_s": med[s]} for s in setups},
            "median_async_drain_seconds": median([x["drain_seconds"] for x in rows["async"]]),
            "ratio_async": med["async"] / med["unprotected"],
            "ratio_sync": med["sync"] / med["unprotected"],
        }

    # ---------------------------------------------------------------- run / cleanup

    def environment(self) -> dict[str, Any]:
        def out(argv: list[str]) -> str:
            try:
                return run(argv, check=False, timeout=30).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                return ""

        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "qemu": out(["qemu-system-x86_64", "--version"]).splitlines()[0:1],
            "accel": None,  # filled in from the first VM (query-kvm): the lab's VMs do not ask for KVM
            "drtool_commit": out(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
            "drtool_dirty": bool(out(["git", "-C", str(REPO), "status", "--porcelain", "--", "drtool"])),
            "args": {k: v for k, v in vars(self.args).items() if k != "json_out"},
        }  # fmt: skip

    def run(self) -> dict[str, Any]:
        self.results["environment"] = self.environment()
        self.lab = Lab(hosts=("site-a", "site-b"))
        self.lab.start()
        log(f"lab {self.lab.id} up in {self.lab.dir}")
        try:
            if not self.args.skip_sync:
                self.initial_sync()
            if not self.args.skip_writes:
                self.guest_writes()
        finally:
            self.cleanup()
        self.results["environment"]["loadavg_end"] = os.getloadavg()
        return self.results

    def cleanup(self) -> None:
        for config in list(self.protected):
            names = re.findall(r"^\[vms\.\"?([^\]\"]+)\"?\]", config.read_text(), re.MULTILINE)
            for name in names:
                try:
                    drtool(config, "unprotect", name, "--delete-replicas", timeout=300)
                except Exception as exc:  # noqa: BLE001
                    log(f"cleanup: unprotect {name}: {exc}")
        self.protected.clear()
        for ref in self.references:
            ref.stop()
        if self.lab is not None:
            problems = self.lab.stop()
            for p in problems:
                log(f"lab teardown: {p}")


# --------------------------------------------------------------------------- report


def report_rows(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    sync = res.get("initial_sync")
    if sync:
        d = sync["drtool"]
        n = sync["rounds"]
        rows.append((f"initial sync: {human(sync['data_bytes'])} data in {human(sync['virtual_size'])} virtual",
                     f"median of {n}", ""))
        rows.append(("  drtool protect, wall clock",
                     f"{d['median_wall_seconds']:.2f} s  {rate(d['data_rate_wall'])} data, "
                     f"{rate(d['virtual_rate_wall'])} virtual", ""))
        rows.append(("  drtool protect, its own seconds",
                     f"{d['median_reported_seconds']:.2f} s  {rate(d['data_rate_reported'])} data", ""))
        if d["median_copy_seconds"]:
            rows.append(("  drtool mirror copy phase (created->ready)",
                         f"{d['median_copy_seconds']:.2f} s  {rate(d['data_rate_copy'])} data, "
                         f"{rate(d['virtual_rate_copy'])} virtual", ""))
        if d.get("median_source_qemu_cpu_seconds") is not None:
            gib = sync["data_bytes"] / GiB
            tq = d.get("median_target_qsd_cpu_seconds")
            rows.append(("  CPU per GiB of data: source QEMU / DR qemu-storage-daemon",
                         f"{d['median_source_qemu_cpu_seconds'] / gib:.2f} s / "
                         + (f"{tq / gib:.2f} s" if tq is not None else "?"), "during protect"))
        rows.append(("  reference TLS cipher suite (probed with GnuTLS's log)", sync.get("reference_tls_cipher", "?"),
                     f"priority: {sync.get('reference_tls_priority') or 'QEMU default'}"))
        for p, ref in sync["reference"].items():
            label = "socat relay (drtool's link options)" if p == "relay" else "direct TCP, no relay"
            rows.append((f"  reference qemu-img convert -n, {label}",
                         f"{ref['median_wall_seconds']:.2f} s  {rate(ref['data_rate'])} data, "
                         f"{rate(ref['virtual_rate'])} virtual", "TLS-PSK, qsd writethrough=on"))
            ok = "OK" if ref["ratio_drtool_wall"] >= 0.8 else "BELOW GOAL"
            rows.append((f"  ratio drtool/reference ({p}), wall clock", f"{ref['ratio_drtool_wall']:.2f}",
                         f"goal >= 0.80: {ok}"))
            if ref["ratio_drtool_copy"] is not None:
                rows.append((f"  ratio drtool/reference ({p}), copy phase only", f"{ref['ratio_drtool_copy']:.2f}",
                             "excludes protect's setup"))
        b = sync["bytes_sent"]
        ok = "OK" if b["ratio_to_data"] <= 1.1 else "HOLES SENT?"
        rows.append(("bytes received by the DR target (ss, NBD port)",
                     f"{human(b['median_nbd_bytes_received'])}  = {b['ratio_to_data']:.3f} x data, "
                     f"{b['ratio_to_virtual']:.3f} x virtual", f"goal ~1.0 x data: {ok}"))
        rows.append(("  site link rx (incl. TCP/IP headers)", human(b["median_site_link_rx_bytes"]), ""))
        rep = b["replica"]
        rows.append(("  replica allocation",
                     f"actual-size {human(rep['actual_size'])}, data extents {human(rep['data_extents'])}",
                     f"virtual {human(rep['virtual_size'])}"))
    gw = res.get("guest_writes")
    if gw:
        rows.append((f"guest writes: {human(gw['bytes_per_round'])} in {human(gw['chunk'])} writes",
                     f"median of {gw['rounds']}", "HMP qemu-io on the virtio backend"))
        for s in ("unprotected", "async", "sync"):
            rows.append((f"  {s}", f"{gw['setups'][s]['median_mib_per_s']:.1f} MiB/s", ""))
        rows.append(("  ratio async / unprotected", f"{gw['ratio_async']:.2f}", ""))
        if gw.get("median_async_drain_seconds") is not None:
            rows.append(("  async: replica caught up after the last write", f"{gw['median_async_drain_seconds']:.2f} s",
                         ""))
        rows.append(("  ratio sync / unprotected", f"{gw['ratio_sync']:.2f}", ""))
    return rows


def print_report(res: dict[str, Any], plain: bool) -> None:
    rows = report_rows(res)
    env = res["environment"]
    title = (f"drtool replication benchmark — {env['cpus']} CPUs, {(env.get('accel') or '?').upper()}, "
             f"{(env['qemu'] or ['?'])[0]}")
    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=title)
            for col in ("measure", "result", "notes"):
                table.add_column(col)
            for row in rows:
                table.add_row(*row)
            Console(width=max(shutil.get_terminal_size((160, 20)).columns, 160)).print(table)
            return
        except ImportError:
            pass
    print(title)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:<{w1}}  {c}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=2 * GiB, help="virtual size of the seeded disk (2G)")
    ap.add_argument("--data", type=parse_size, default=GiB, help="data written at its start (1G)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per measurement (3; --quick: 1)")
    ap.add_argument("--write-size", type=parse_size, default=None, help="guest writes per round (256M; --quick: 64M)")
    ap.add_argument("--write-chunk", type=parse_size, default=4 * MiB, help="size of one guest write (4M)")
    ap.add_argument("--reference-path", choices=("relay", "direct", "both"), default="both",
                    help="how the reference reaches the target: socat relay like drtool, direct TCP, or both")
    ap.add_argument("--reference-tls-priority", default=TLS_PRIORITY, metavar="PRIORITY",
                    help=f"GnuTLS priority for the reference's TLS client (default: drtool's own, {TLS_PRIORITY}, "
                         "so both negotiate the same cipher; '' for QEMU's default)")
    ap.add_argument("--quick", action="store_true", help="1 round, smaller guest writes")
    ap.add_argument("--skip-sync", action="store_true", help="skip the initial sync measurements (1-3)")
    ap.add_argument("--skip-writes", action="store_true", help="skip the guest write measurements (4)")
    ap.add_argument("--plain", action="store_true", help="plain text table instead of rich")
    ap.add_argument("--json-out", type=Path, default=DEFAULT_JSON, help=f"JSON results ({DEFAULT_JSON.relative_to(REPO)})")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.write_size is None:
        args.write_size = 64 * MiB if args.quick else 256 * MiB
    if not 0 < args.data <= args.size:
        ap.error("--data must be > 0 and <= --size")
    if os.geteuid() != 0:
        ap.error("needs root: the lab creates network namespaces")
    for tool in ("qemu-system-x86_64", "qemu-img", "qemu-io", "qemu-storage-daemon", "socat", "ss"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found")

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    bench = Bench(args)
    try:
        res = bench.run()
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        return 130
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(res, indent=2) + "\n")
    print_report(res, args.plain)
    print(f"JSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
