"""A private etcd subprocess on free ports, for the etcd backend tests.

``EtcdProcess`` (from :mod:`im.cluster`, which ``im cluster`` uses too) owns one etcd: a temporary data
directory, a client and a peer port. ``stop`` then ``start`` restarts it on the same ports and data
directory (what an operator's restart looks like to clients). ``shared_etcd()`` is the one the contract
suite uses: started on first use, stopped when the test process exits. ``EtcdCluster`` is a private
three-member etcd, for failover between members (``registry.etcd_endpoints``).

When the ``etcd`` binary is missing, :class:`EtcdMissing` says how to install it: the tests that need etcd
then fail; they never skip.
"""

from __future__ import annotations

import atexit
import threading

from im.cluster import ETCD_INSTALL_HINT, EtcdMissing, EtcdProcess

INSTALL_HINT = ETCD_INSTALL_HINT
__all__ = ["INSTALL_HINT", "EtcdCluster", "EtcdMissing", "EtcdProcess", "shared_etcd"]


_shared: EtcdProcess | None = None
_shared_error: BaseException | None = None


def shared_etcd() -> EtcdProcess:
    """The test process's etcd, started on first use (a free port clash gets two more tries) and
    destroyed at exit. A failure to start is remembered, so every later caller fails at once with it."""
    global _shared, _shared_error
    if _shared is not None:
        return _shared
    if _shared_error is not None:
        raise RuntimeError(f"the shared etcd failed to start: {_shared_error}") from _shared_error
    for attempt in range(3):
        etcd = EtcdProcess()
        try:
            etcd.start()
        except EtcdMissing as e:
            etcd.destroy()
            _shared_error = e
            raise
        except RuntimeError as e:
            etcd.destroy()
            if attempt == 2:
                _shared_error = e
                raise
            continue
        _shared = etcd
        atexit.register(etcd.destroy)
        return etcd
    raise AssertionError("unreachable")


class EtcdCluster:
    """A private etcd cluster of ``size`` members on free ports, each an :class:`EtcdProcess` (stop and
    start one to fail it). Members start in parallel: each is healthy only once a majority is up.
    Elections are slower than a lone member's (50 ms heartbeat, 500 ms election timeout), so that a
    loaded machine does not make the leader change all the time; leases still go down to 1 s."""

    def __init__(self, size: int = 3) -> None:
        self.members = [EtcdProcess(name=f"m{i}", heartbeat_ms=50, election_ms=500) for i in range(size)]
        peers = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)
        for m in self.members:
            m.initial_cluster = peers

    @property
    def endpoints(self) -> list[str]:
        """``host:port`` of every member, in order (``registry.etcd_endpoints``)."""
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        errors: list[BaseException] = []

        def start(member: EtcdProcess) -> None:
            try:
                member.start(timeout)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=start, args=(m,)) for m in self.members]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.destroy()
            raise errors[0]
        return self

    def destroy(self) -> None:
        for m in self.members:
            m.destroy()
