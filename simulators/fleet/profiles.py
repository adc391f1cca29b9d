"""Hardware profiles of virtual devices: inference latency, memory and link speed per board.

The figures scale the simulated behaviour; they are not measured by the simulator. Sources (also in
``docs/simulator.md``):

* CPU speed relative to an x86-64 desktop core: the Raspberry Pi Foundation gives the Pi 5 "2-3x"
  the CPU performance of the Pi 4; published ONNX Runtime / TFLite MobileNet-v2 single-thread figures
  put the Pi 4 (Cortex-A72, 1.5 GHz) at roughly 6-8x a desktop core and the Jetson Orin Nano's
  Cortex-A78AE CPU (no GPU use here) at roughly 2x.
* Memory: the common SKUs (Pi 4 4 GB, Pi 5 8 GB, Orin Nano 8 GB dev kit, a 16 GB x86 box).
* Link: typical sustained throughput of the boards' usual links in the field (Wi-Fi 5 on the Pis,
  gigabit Ethernet on the Jetson and the x86 box), with a round-trip time for a remote server.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    hw_class: str
    arch: str
    memory_mb: int
    latency_scale: float  # inference latency relative to an x86-64 desktop core
    base_latency_ms: float  # the tiny bundle's local latency on this board
    link_mbps: float  # sustained download throughput
    rtt_ms: float  # round trip to the fleet server

    def transfer_s(self, nbytes: int, requests: int = 1, slow_factor: float = 1.0) -> float:
        """Simulated time a transfer of ``nbytes`` in ``requests`` round trips takes on this link."""
        return requests * self.rtt_ms / 1000.0 + nbytes * 8 / (self.link_mbps * 1e6 / slow_factor)


PROFILES: dict[str, HardwareProfile] = {
    "pi4": HardwareProfile("pi4", "pi4", "aarch64", 4096, 7.0, 3.5, 40.0, 40.0),
    "pi5": HardwareProfile("pi5", "pi5", "aarch64", 8192, 2.8, 1.4, 80.0, 40.0),
    "orin-nano": HardwareProfile("orin-nano", "jetson-orin-nano", "aarch64", 8192, 2.0, 1.0, 300.0, 30.0),
    "x86": HardwareProfile("x86", "x86-box", "x86_64", 16384, 1.0, 0.5, 500.0, 20.0),
}


def assign_profiles(count: int, shares: dict[str, float]) -> list[HardwareProfile]:
    """``count`` profiles in the given shares (largest remainder), deterministic order."""
    total = sum(shares.values()) or 1.0
    exact = {name: count * share / total for name, share in shares.items()}
    counts = {name: int(value) for name, value in exact.items()}
    for name in sorted(exact, key=lambda n: exact[n] - counts[n], reverse=True)[: count - sum(counts.values())]:
        counts[name] += 1
    out: list[HardwareProfile] = []
    for name, n in counts.items():
        out += [PROFILES[name]] * n
    return out
