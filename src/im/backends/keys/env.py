"""The master key from an environment variable (the one ``encryption.key_env`` names, e.g. ``IM_MASTER_KEY``):
32 bytes in base64.

The composition root reads the variable and hands the text here; nothing else in the process reads it.
Suits deployments whose secrets arrive as environment variables (a container orchestrator's secret, a
systemd credential). Make one with ``python -c "import base64,os; print(base64.b64encode(os.urandom(32)).decode())"``
and give every node of the cluster the same value.
"""

from __future__ import annotations

from im.backends.keys.aes import AesKeyProvider, decode_master_key


class EnvKeyProvider(AesKeyProvider):
    """The master key given as base64 text; ``name`` (the variable's) is only used in messages."""

    def __init__(self, text: str, *, name: str = "IM_MASTER_KEY") -> None:
        self.name = name
        # Checked now, so a bad value fails at configuration time; kept only in the cipher.
        self._pending: bytes | None = decode_master_key(text, source=f"environment variable {name}")

    async def _acquire(self) -> None:
        if self._pending is None:
            raise RuntimeError("EnvKeyProvider was closed")
        self._set_master(self._pending)

    async def _release(self) -> None:
        self._pending = None
        await super()._release()
