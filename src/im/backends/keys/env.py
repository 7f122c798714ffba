"""The master key from an environment variable (the one ``encryption.key_env`` names, e.g. ``IM_MASTER_KEY``):
32 bytes in base64.

The composition root reads the variable and hands the text here; nothing else in the process reads it.
Suits deployments whose secrets arrive as environment variables (a container orchestrator's secret, a
systemd credential). Make one with ``python -c "import base64,os; print(base64.b64encode(os.urandom(32)).decode())"``
and give every node of the cluster the same value.

During a master key rotation the variable holds several keys, the current one first, separated by
commas (``IM_MASTER_KEY=NEW,OLD``): the first wraps, all unwrap. The variable is read once, at start: a
running process does not see a changed value (restart it, one node at a time).
"""

from __future__ import annotations

from im.backends.keys.aes import AesKeyProvider, decode_master_keys


class EnvKeyProvider(AesKeyProvider):
    """The master key(s) given as base64 text (several: comma separated, current first); ``name`` (the
    variable's) is only used in messages."""

    def __init__(self, text: str, *, name: str = "IM_MASTER_KEY") -> None:
        self.name = name
        # Checked now, so a bad value fails at configuration time; kept only in the cipher.
        self._pending: list[bytes] | None = decode_master_keys(text, source=f"environment variable {name}")

    async def _acquire(self) -> None:
        if self._pending is None:
            raise RuntimeError("EnvKeyProvider was closed")
        self._set_masters(self._pending)

    async def _release(self) -> None:
        self._pending = None
        await super()._release()
