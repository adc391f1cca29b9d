"""How long rollout creation and engine ticks take on a large fleet (a measurement, not a test).

    .venv/bin/python -m tests.fleet_server.rollouts.scale_probe --devices 10000

Creates its own PostgreSQL database (dropped afterwards), N devices on digits@1 in one group, a
rollout of digits@2 with waves 1%,10%,50%,100%, and drives it with a fake clock: every released device
reports an install event and one metric window covering the soak. Prints the time of creation and of
each tick with the number of devices released so far.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from fleet_server.db import make_engine, make_session_factory, session_scope, upgrade_database
from fleet_server.models import Assignment, Device, DeviceEvent, DeviceGroup, DeviceGroupMember, MetricWindow
from fleet_server.rollouts.engine import RolloutEngine
from fleet_server.rollouts.models import RolloutDevice
from fleet_server.rollouts.service import CreateRequest, act, create_rollout
from fleet_server.rollouts.spec import RolloutPolicy, parse_waves
from tests.fleet_server.rollouts.fleetsim import CAPS, T0, Clock, publish, window_payload

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=10_000)
    args = parser.parse_args()
    name = f"edgefleet_rollouts_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    try:
        upgrade_database(url)
        engine = make_engine(url)
        run(make_session_factory(engine), args.devices)
        engine.dispose()
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def run(factory, n: int) -> None:
    ids = [f"dev-{i:08d}" for i in range(n)]
    with session_scope(factory) as session, tempfile.TemporaryDirectory() as tmp:
        manifests = {v: publish(session, Path(tmp), "digits", v) for v in (1, 2)}
        session.add(DeviceGroup(id=1, name="lab"))
        session.flush()
        session.execute(
            sa.insert(Device),
            [
                {
                    "id": d,
                    "public_key": uuid.uuid4().hex * 2,
                    "fleet": "lab",
                    "status": "accepted",
                    "capabilities": CAPS,
                    "installed": [],
                }
                for d in ids
            ],
        )
        session.execute(sa.insert(DeviceGroupMember), [{"group_id": 1, "device_id": d} for d in ids])
        session.execute(sa.insert(Assignment), [{"device_id": d, "model_name": "digits", "bundle_version": 1,
                                                 "variant": "onnx-fp32", "pinned": False, "updated_at": T0}
                                                for d in ids])  # fmt: skip
    clock = Clock()
    policy = RolloutPolicy(waves=parse_waves("1%,10%,50%,100%"), gates=("error_rate<0.01", "p99_ms<40", "psi<0.2"),
                           soak_s=600, device_timeout_s=300, jitter_s=0)  # fmt: skip
    started = time.perf_counter()
    with session_scope(factory) as session:
        rollout_id = create_rollout(session, CreateRequest("digits", 2, ("group:lab",), policy), "probe", clock()).id
    print(f"create: {n} devices in {time.perf_counter() - started:.2f} s")
    drive(factory, clock, rollout_id, manifests)
    started = time.perf_counter()
    with session_scope(factory) as session:
        restored = act(session, rollout_id, "rollback", "probe", clock()).id
    print(f"rollback of {n} devices: {time.perf_counter() - started:.2f} s (rollout {restored})")


def drive(factory, clock, rollout_id, manifests) -> None:
    engine, reported = RolloutEngine(factory, clock=clock), set()
    payload = window_payload(manifests[2], requests=200)
    for _ in range(12):
        started = time.perf_counter()
        decisions = engine.tick()
        elapsed = time.perf_counter() - started
        with factory() as session:
            released = list(session.execute(sa.select(RolloutDevice.device_id, RolloutDevice.start_after).where(
                RolloutDevice.rollout_id == rollout_id, RolloutDevice.released_at.is_not(None))))  # fmt: skip
        print(f"tick: {elapsed:.2f} s, {len(released)} released, decisions {[d.action for d in decisions]}")
        if decisions and decisions[-1].action in ("complete", "rollback"):
            break
        report(factory, [(d, s) for d, s in released if d not in reported], payload)
        reported.update(d for d, _ in released)
        clock.advance(602)


def report(factory, devices, payload) -> None:
    with session_scope(factory) as session:
        session.execute(sa.insert(DeviceEvent), [
            {"batch_pk": 0, "device_id": d, "type": "install", "model_name": "digits", "bundle_version": 2, "at": s,
             "payload": {"type": "install", "result": "installed", "version": 2}} for d, s in devices])  # fmt: skip
        session.execute(sa.insert(MetricWindow), [
            {"batch_pk": 0, "device_id": d, "model_name": "digits", "bundle_version": 2, "window_start": s,
             "window_end": s + dt.timedelta(seconds=601), "payload": payload} for d, s in devices])  # fmt: skip


if __name__ == "__main__":
    main()
