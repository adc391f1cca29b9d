"""The daemon loop of ``edgefleet-agent run``.

Start: serve the localhost HTTP API, then recover (finish an interrupted deployment, settle the
slots). Loop: poll the desired state (``If-None-Match`` with the last ETag; the last desired state is
kept on disk so a restart does not need the network to know its targets), apply it (one deployment
per model whose committed version differs; a bundle that failed to download, verify or unpack is
retried with exponential backoff, one that failed its health check is not retried), report the
inventory when it changed, close telemetry windows and upload them. Waits ``poll_interval_s`` plus or
minus ``jitter_s`` (both can come from the server) between polls, and backs off exponentially with
jitter while the server cannot be reached.

Once started, what start-up allocated (imported modules, runtimes, the models being served, some
50,000 objects) is frozen out of the garbage collector's way (``gc.freeze``): a full collection then
scans only what was allocated since, instead of pausing every thread for ~10 ms on a 2-core x86 host,
which a request with a tight deadline would feel.
"""

from __future__ import annotations

import gc
import logging
import random
import threading
import time
from collections.abc import Mapping
from typing import Any

from bundles.contract import DesiredState, FallbackSection, SavedDesiredState, parse, to_dict
from bundles.errors import AuthError, EdgeFleetError, TransportError
from device_agent.agent import Agent
from device_agent.client import FleetClient
from device_agent.identity import Enrollment, trusted_root_bytes
from device_agent.retry_after import retry_wait_s
from device_agent.shadow import ShadowMode
from device_agent.update.backoff import backoff_s
from device_agent.update.source import TufSource

log = logging.getLogger(__name__)


class Daemon:
    """Drives one :class:`Agent`: updates, inventory, telemetry upload, HTTP API."""

    def __init__(self, agent: Agent, stop: threading.Event | None = None) -> None:
        self.agent, self.config = agent, agent.config
        self.stop = stop or threading.Event()
        self.wake = threading.Event()  # set by SIGHUP (``systemctl reload``): poll now
        self.desired_path = self.config.state_dir / "desired.json"
        saved = agent.files.load(self.desired_path, SavedDesiredState, SavedDesiredState(),
                                 action="the desired state is fetched again at the next poll")  # fmt: skip
        self._desired: DesiredState | None = saved.state
        self.etag: str | None = saved.etag
        self.client: FleetClient | None = None
        self.uploader: Any = None
        self.failures = 0
        self._inventory_sent: dict[str, Any] | None = None
        self.shadows = ShadowMode(agent)

    @property
    def desired(self) -> DesiredState | None:
        """The desired state followed now (the last one the server sent, or the saved one)."""
        return self._desired

    @desired.setter
    def desired(self, value: DesiredState | Mapping[str, Any] | None) -> None:
        self._desired = value if value is None or isinstance(value, DesiredState) else parse(DesiredState, value)

    def connect(self) -> bool:
        """Wire the fleet client, the TUF source and the telemetry uploader from the enrollment."""
        enrollment = Enrollment.load(self.config.identity_dir, self.agent.files)
        if enrollment is None:
            log.warning("not enrolled: run 'edgefleet-agent enroll --server URL --token T'; serving installed models")
            return False
        self.client = FleetClient(enrollment.server_url, enrollment.access_token, self.config.request_timeout_s)
        self.agent.updater.set_source(TufSource(self._tuf_client(enrollment)))
        if self.agent.recorder is not None:
            from device_agent.telemetry.uploader import TelemetryUploader

            self.uploader = TelemetryUploader(
                self.agent.recorder.buffer, self.client.http, headers=self.client.headers,
                backoff_initial_s=self.config.backoff_initial_s, backoff_max_s=self.config.backoff_max_s,
            )  # fmt: skip
        return True

    def _tuf_client(self, enrollment: Enrollment) -> Any:
        from bundles.tuf.client import TufClient

        metadata_dir = self.config.tuf_dir / "metadata"
        self._heal_tuf_root(metadata_dir / "root.json")
        root = None if (metadata_dir / "root.json").exists() else trusted_root_bytes(self.config.identity_dir)
        return TufClient(
            metadata_dir, self.config.tuf_dir / "targets", enrollment.metadata_url, enrollment.targets_url,
            trusted_root=root, bearer_token=enrollment.access_token, timeout_s=self.config.request_timeout_s,
            http=None if self.client is None else self.client.http,
        )  # fmt: skip

    def _heal_tuf_root(self, path: Any) -> None:
        """A cached TUF root that is not signed root metadata is set aside: the enrolled root bootstraps again.

        Trust is not lowered: ngclient then walks the root chain up from the enrolled root, checking
        every rotation's signatures, exactly as on the first update.
        """
        from tuf.api.metadata import Metadata, Root

        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            problem = f"unreadable: {e.strerror or e}"
        else:
            try:
                md: Any = Metadata.from_bytes(raw)
                problem = "" if isinstance(md.signed, Root) else f"holds {md.signed.type} metadata, not root"
            except Exception as e:  # noqa: BLE001 - whatever the parser raises, the file is unusable
                problem = f"not TUF root metadata: {type(e).__name__}: {e}"
        if problem:
            self.agent.files.quarantine(path, problem, "the root from enrollment bootstraps TUF again")

    def run(self, once: bool = False, http: bool = True) -> None:
        """Serve and update until :attr:`stop` is set (or one round with ``once``)."""
        server = None
        self.agent.updater.expect_recovery()  # requests that come before the slots are verified wait for them
        if http:
            from device_agent.httpapi import AgentHttpServer, http_settings

            settings = http_settings(self.config)
            server = AgentHttpServer(self.agent, settings.host, settings.port, settings).start()
            log.info("serving the Open Inference Protocol on %s", server.url)
        try:
            self.agent.updater.recover()
            self._follow_desired_sections()
            enrolled = self.connect()
            gc.freeze()  # start-up objects (modules, runtimes, models): out of every full collection's scan
            while not self.stop.is_set():
                wait_s = self.round() if enrolled else self.config.poll_interval_s
                if once:
                    break
                self.wake.wait(wait_s)
                self.wake.clear()
        finally:
            gc.unfreeze()
            if server is not None:
                server.stop()
            self.agent.close()

    def request_stop(self) -> None:
        """Finish the current round and exit (SIGTERM)."""
        self.stop.set()
        self.wake.set()

    def round(self) -> float:
        """One poll-apply-report round; returns the seconds to wait before the next one."""
        self.agent.last_round_at = time.time()
        try:
            self.poll()
        except AuthError as e:
            log.error("the server refuses this device: %s", e)
            self.failures += 1
            return self.config.backoff_max_s
        except TransportError as e:
            self.failures += 1
            backoff = backoff_s(self.failures, self.config.backoff_initial_s, self.config.backoff_max_s)
            wait_s = retry_wait_s(e, backoff, self.config.backoff_max_s)
            log.warning("cannot reach the fleet server (%s); next try in %.0f s", e, wait_s)
            return wait_s
        except EdgeFleetError as e:
            self.failures += 1
            log.error("update round failed: %s", e)
            return backoff_s(self.failures, self.config.backoff_initial_s, self.config.backoff_max_s)
        self.failures = 0
        if self.desired is not None or self.agent.updater.redownload:
            self.apply()
        self.report()
        return self._poll_interval_s()

    def poll(self) -> None:
        """Fetch the desired state (304 keeps the one we have), validate it and persist it."""
        assert self.client is not None
        state, etag = self.client.desired_state(self.etag)
        if state is not None:
            self.desired, self.etag = state, etag
            self.agent.files.save(self.desired_path, SavedDesiredState(state, etag), mode=0o600)

    def apply(self) -> None:
        """Deploy what the desired state names and follow its fallback and telemetry settings."""
        desired = self.desired or DesiredState()
        self._follow_desired_sections()
        for record in self.agent.updater.apply(desired):
            log.info("deployment %s: %s (%s)", record.ref, record.status.value, record.error or "no error")
        self.shadows.apply(to_dict(desired))

    def _follow_desired_sections(self) -> None:
        """The fallback and telemetry sections of the (saved) desired state: followed from start, before any poll."""
        if self.desired is None:
            return
        self._apply_fallback(self.desired.fallback)
        if self.agent.recorder is not None and self.desired.telemetry is not None:
            recorder = self.agent.recorder
            recorder.settings = recorder.settings.with_desired(to_dict(self.desired.telemetry))

    def _apply_fallback(self, section: FallbackSection | Mapping[str, Any] | None) -> None:
        self.agent.follow_fallback(section)

    def report(self) -> None:
        """Inventory when it changed; close telemetry windows and upload what is buffered."""
        assert self.client is not None
        inventory = self.agent.inventory()
        comparable = {k: v for k, v in inventory.items() if k != "capabilities"}
        if comparable != self._inventory_sent:
            try:
                self.client.put_inventory(inventory)
                self._inventory_sent = comparable
            except EdgeFleetError as e:
                log.warning("inventory report failed: %s", e)
        if self.agent.recorder is not None:
            self.heartbeat(inventory)
            self.agent.recorder.tick()
        if self.uploader is not None:
            self.uploader.maybe_drain()

    def heartbeat(self, inventory: dict[str, Any]) -> None:
        """One heartbeat per round: installed versions and their state, health, queue counters."""
        recorder = self.agent.recorder
        models = [{"name": i["name"], "version": i["version"], "state": i["state"]} for i in inventory["installed"]]
        models += self.shadows.heartbeat_models()
        engine = self.agent.engine
        recorder.heartbeat(
            time.time() - self.agent.started_at, models, health=self.agent.health(), serving=engine.models(),
            queue=engine.describe()["queue"], update_in_progress=_value_of(self.agent.updater.in_progress()),
            repairs=len(self.agent.files.repairs),
        )  # fmt: skip

    def _poll_interval_s(self) -> float:
        desired = self.desired or DesiredState()
        interval = float(desired.poll_interval_s or self.config.poll_interval_s)
        jitter = float(self.config.jitter_s if desired.jitter_s is None else desired.jitter_s)
        return max(1.0, interval + random.uniform(-jitter, jitter))


def _value_of(state: Any) -> Any:
    return None if state is None else getattr(state, "value", state)
