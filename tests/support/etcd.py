"""A private etcd subprocess on free ports, for the etcd backend tests.

``EtcdProcess`` (from :mod:`im.cluster`, which ``im cluster`` uses too) owns one etcd: a temporary data
directory, a client and a peer port. ``stop`` then ``start`` restarts it on the same ports and data
directory (what an operator's restart looks like to clients). ``shared_etcd()`` is the one the contract
suite uses: started on first use, stopped when the test process exits.

When the ``etcd`` binary is missing, :class:`EtcdMissing` says how to install it: the tests that need etcd
then fail; they never skip.
"""

from __future__ import annotations

import atexit

from im.cluster import ETCD_INSTALL_HINT, EtcdMissing, EtcdProcess

INSTALL_HINT = ETCD_INSTALL_HINT
__all__ = ["INSTALL_HINT", "EtcdMissing", "EtcdProcess", "shared_etcd"]


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
