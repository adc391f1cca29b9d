"""Which models are loaded: versions from the catalog, loading from verified bundles, an LRU memory budget.

:class:`Catalog` reads the published ``name@version`` list from the server's database (cached for
a few seconds). :class:`ModelRepository` resolves a request to one version (the one asked, else the
calling device's own assignment, else the newest), loads it on first use (lazy) or at start (eager),
and keeps the loaded models under ``memory_budget_mb``: the least recently used ones are unloaded
to make room, once their requests in progress are done. Loads run one at a time on a worker thread
(fetch and verify through TUF, unpack, load the runtime, golden self-test), so the event loop keeps
answering other models meanwhile. A model whose load failed says why in the index and its ``ready``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bundles.errors import BusyError, EdgeFleetError
from fleet_server.inference.batching import Runner
from fleet_server.inference.models import BundleLoader, ModelLoader, ServedModel
from fleet_server.inference.source import ModelNotFoundError, VerifiedBundles
from fleet_server.models import BundleRecord

log = logging.getLogger("fleet_server.inference")
CATALOG_TTL_S = 5.0
Key = tuple[str, int]


class Catalog:
    """Published bundles (name -> versions, newest first) from the database, cached for a few seconds."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory
        self._versions: dict[str, list[int]] = {}
        self._read_at = -1e9

    def versions(self) -> dict[str, list[int]]:
        """Every published model and its versions (call from a worker thread: it may query the database)."""
        if time.monotonic() - self._read_at > CATALOG_TTL_S:
            found: dict[str, list[int]] = collections.defaultdict(list)
            with self.session_factory() as session:
                rows = session.execute(
                    select(BundleRecord.name, BundleRecord.version).order_by(
                        BundleRecord.name, BundleRecord.version.desc()
                    )
                )
                for name, version in rows:
                    found[name].append(int(version))
            self._versions, self._read_at = dict(found), time.monotonic()
        return self._versions

    def fresh(self) -> dict[str, list[int]] | None:
        """The cached list while it is fresh (no thread hop on the hot path), else None."""
        return self._versions if time.monotonic() - self._read_at <= CATALOG_TTL_S else None


class NotEnoughMemoryError(BusyError):
    """A model is bigger than the whole memory budget (503)."""


@dataclass
class Entry:
    """A loaded model, its runner, and how many requests use it now."""

    model: ServedModel
    runner: Runner
    in_use: int = 0
    evicted: bool = False
    last_used: float = field(default_factory=time.monotonic)


class ModelRepository:
    """Loaded models under a memory budget (module docstring)."""

    def __init__(
        self,
        bundles: VerifiedBundles,
        catalog: Catalog,
        make_runner: Callable[[ServedModel], Runner],
        budget_bytes: int,
        memory_per_byte: float,
        on_change: Callable[[int, int], None] | None = None,
    ) -> None:
        self.bundles, self.catalog, self.make_runner = bundles, catalog, make_runner
        self.budget_bytes, self.memory_per_byte = budget_bytes, memory_per_byte
        self.loaders: list[ModelLoader] = [BundleLoader()]
        """Tried in order; the first that accepts a bundle loads it (another kind of model goes first)."""
        self.on_change = on_change
        self._loaded: collections.OrderedDict[Key, Entry] = collections.OrderedDict()  # least recently used first
        self._failed: dict[Key, str] = {}
        self._load_lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()

    # --- versions -----------------------------------------------------------------------------------

    async def resolve(self, name: str, version: str | None, preferred: int | None = None) -> Key:
        """The version a request means: the one asked, else ``preferred`` (a device's own), else the newest."""
        catalog = self.catalog.fresh()
        if catalog is None:
            catalog = await asyncio.to_thread(self.catalog.versions)
        versions = catalog.get(name)
        if not versions:
            raise ModelNotFoundError(f"model '{name}' is not published on this server")
        if version is None:
            return name, preferred if preferred is not None and preferred in versions else versions[0]
        if not version.isdigit() or int(version) not in versions:
            listed = ", ".join(str(v) for v in versions[:10])
            raise ModelNotFoundError(f"model '{name}' has no version '{version[:40]}' (published: {listed})")
        return name, int(version)

    # --- loading ------------------------------------------------------------------------------------

    def loaded(self, key: Key) -> Entry | None:
        return self._loaded.get(key)

    async def load(self, key: Key) -> Entry:
        """The loaded model ``key`` (loading it, and unloading others to make room, if needed)."""
        entry = self._loaded.get(key)
        if entry is not None:
            return entry
        async with self._load_lock:
            entry = self._loaded.get(key)
            if entry is not None:
                return entry
            try:
                model = await self._load_model(key)
            except EdgeFleetError as e:
                self._failed[key] = str(e)
                raise
            self._failed.pop(key, None)
            entry = Entry(model, self.make_runner(model))
            self._loaded[key] = entry
            self._changed()
            log.info("loaded %s@%s (%.1f MB)", key[0], key[1], model.memory_bytes / 2**20)
            return entry

    async def _load_model(self, key: Key) -> ServedModel:
        """Verified bundle (thread) -> room under the budget (here) -> runtime and self-test (thread)."""
        bundle = await asyncio.to_thread(self.bundles.open, *key)
        loader = next(loader for loader in self.loaders if loader.accepts(bundle.manifest))
        size = sum(f.size_bytes for f in bundle.manifest.variant(bundle.variant).files) * self.memory_per_byte
        if size > self.budget_bytes:
            raise NotEnoughMemoryError(
                f"{key[0]}@{key[1]} needs about {size / 2**20:.0f} MB, over the whole memory budget "
                f"({self.budget_bytes / 2**20:.0f} MB)"
            )
        self._make_room(int(size))
        return await asyncio.to_thread(loader.load, bundle, self.memory_per_byte)

    def _make_room(self, needed: int) -> None:
        """Unload least recently used models until ``needed`` more bytes fit the budget."""
        while self._loaded and self.used_bytes() + needed > self.budget_bytes:
            key, entry = next(iter(self._loaded.items()))
            self._evict(key, entry)

    def _evict(self, key: Key, entry: Entry) -> None:
        self._loaded.pop(key, None)
        entry.evicted = True
        self._changed()
        log.info("unloaded %s@%s to make room", *key)
        if entry.in_use == 0:
            self._close_soon(entry)

    def _close_soon(self, entry: Entry) -> None:
        """Close an unloaded model's runner and runtime (in the background: the caller goes on)."""

        async def close() -> None:
            await entry.runner.close()
            await asyncio.to_thread(entry.model.close)

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def unload(self, key: Key) -> bool:
        """Unload ``key`` (False when it was not loaded); requests in progress finish first."""
        entry = self._loaded.get(key)
        if entry is None:
            return False
        self._evict(key, entry)
        return True

    @contextlib.asynccontextmanager
    async def use(self, key: Key) -> AsyncIterator[Entry]:
        """Hold ``key`` loaded while a request uses it (marked most recently used)."""
        entry = await self.load(key)
        entry.in_use += 1
        if not entry.evicted:
            self._loaded.move_to_end(key)
        try:
            yield entry
        finally:
            entry.in_use -= 1
            if entry.evicted and entry.in_use == 0:
                self._close_soon(entry)

    # --- state --------------------------------------------------------------------------------------

    def used_bytes(self) -> int:
        return sum(e.model.memory_bytes for e in list(self._loaded.values()))

    def failure(self, key: Key) -> str | None:
        return self._failed.get(key)

    async def index(self) -> list[dict[str, Any]]:
        """Every published version: ``READY`` when loaded, ``UNAVAILABLE`` with the reason when its load failed."""
        versions = await asyncio.to_thread(self.catalog.versions)
        items = []
        for name, listed in sorted(versions.items()):
            for version in listed:
                key = (name, version)
                state = "READY" if key in self._loaded else "UNAVAILABLE" if key in self._failed else "UNLOADED"
                item: dict[str, Any] = {"name": name, "version": str(version), "state": state}
                if key in self._failed:
                    item["reason"] = self._failed[key]
                items.append(item)
        return items

    async def close(self) -> None:
        for key, entry in list(self._loaded.items()):
            self._loaded.pop(key)
            await entry.runner.close()
            entry.model.close()
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(len(self._loaded), self.used_bytes())
