"""A private SeaweedFS S3 gateway for the tests of the S3 blob storage (:class:`im.seaweedfs.WeedProcess`,
which ``im cluster --s3`` uses too). ``shared_weed()`` is started on first use and destroyed when the test
process exits; each test keeps to its own key prefix in the one bucket. A missing ``weed`` binary fails the
tests that need it (with how to install it); they never skip."""

from __future__ import annotations

import atexit
import uuid

from im.backends.blobs.s3 import S3Settings
from im.seaweedfs import WeedMissing, WeedProcess

__all__ = ["WeedMissing", "WeedProcess", "s3_settings", "shared_weed"]

_shared: WeedProcess | None = None
_shared_error: BaseException | None = None


def shared_weed() -> WeedProcess:
    """The test process's SeaweedFS, started on first use (a port clash gets two more tries). A failure to
    start is remembered, so every later caller fails at once with it."""
    global _shared, _shared_error
    if _shared is not None:
        return _shared
    if _shared_error is not None:
        raise RuntimeError(f"the shared SeaweedFS failed to start: {_shared_error}") from _shared_error
    for attempt in range(3):
        weed = WeedProcess()
        try:
            weed.start()
        except WeedMissing as e:
            weed.destroy()
            _shared_error = e
            raise
        except RuntimeError as e:
            weed.destroy()
            if attempt == 2:
                _shared_error = e
                raise
            continue
        _shared = weed
        atexit.register(weed.destroy)
        return weed
    raise AssertionError("unreachable")


def s3_settings(weed: WeedProcess, prefix: str | None = None) -> S3Settings:
    """Settings for ``weed``'s bucket under a fresh key prefix (one per test), short timeouts."""
    return S3Settings(
        bucket=weed.bucket,
        endpoint=weed.endpoint,
        region=weed.region,
        prefix=prefix if prefix is not None else f"t-{uuid.uuid4().hex[:12]}/",
        access_key_id=weed.access_key_id,
        secret_access_key=weed.secret_access_key,
        allow_http=True,
        connect_timeout=2.0,
        request_timeout=20.0,
        max_retries=2,
    )
