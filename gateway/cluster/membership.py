"""Who is a member, and which partitions are whose.

The server pins a partition to whichever gateway pulls first and never moves work to a
gateway that joins, so balancing is ours: each gateway keeps a key in a JetStream KV
bucket whose entries expire after ``member_ttl_s`` (``put`` every third of it), lists the
live keys twice a second, and owns the partitions that rendezvous hashing gives it over
that list. Every member computes the same answer from the same list; a join or a leave
moves only the partitions of the member that came or went.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import nats
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType

__all__ = ["Members", "rendezvous", "owner_of"]

log = logging.getLogger(__name__)


def _weight(member: str, p: int) -> bytes:
    return hashlib.blake2b(f"{member}|{p}".encode(), digest_size=8).digest()


def owner_of(p: int, members: Iterable[str]) -> str | None:
    """The member with the highest weight for partition ``p`` (None without members)."""
    return max(members, key=lambda m: _weight(m, p), default=None)


def rendezvous(partitions: int, members: Iterable[str], me: str) -> set[int]:
    """The partitions ``me`` owns among ``members`` (``me`` counts as one of them)."""
    every = set(members) | {me}
    return {p for p in range(partitions) if owner_of(p, every) == me}


class Members:
    """This gateway's membership key and the live member list."""

    def __init__(self, nc: nats.NATS, bucket: str, member: str, *, ttl_s: float, replicas: int) -> None:
        self.nc = nc
        self.bucket = bucket
        self.member = member
        self.ttl_s = ttl_s
        self.replicas = replicas
        self._kv = None

    async def open(self) -> None:
        """Create the bucket if missing (``cluster init`` creates it too), else bind to it."""
        js = self.nc.jetstream()
        try:
            self._kv = await js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            self._kv = await js.create_key_value(KeyValueConfig(
                bucket=self.bucket, ttl=self.ttl_s, replicas=self.replicas, storage=StorageType.MEMORY))

    async def heartbeat(self) -> None:
        """Renew this member's key (its TTL restarts)."""
        assert self._kv is not None
        await self._kv.put(self.member, b"1")

    async def live(self) -> set[str]:
        """The members whose key has not expired."""
        assert self._kv is not None
        try:
            return set(await self._kv.keys())
        except nats.js.errors.NoKeysError:
            return set()

    async def leave(self) -> None:
        """Delete this member's key: the others take its partitions without waiting for the TTL."""
        if self._kv is not None:
            await self._kv.delete(self.member)
