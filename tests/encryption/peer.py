"""A second committer process for tests/encryption/test_keyring.py: on the PostgreSQL schema given, it
seals one message per conversation (creating the first keys, racing the parent) and prints, per
conversation, the sealed body in hex, as JSON on stdout.

    python -m tests.encryption.peer DSN SCHEMA KEY_FILE CONV...
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from im.backends.chat.encrypted import EncryptedChatStore
from im.backends.chat.postgres import PostgresChatStore, PostgresConversationKeys
from im.backends.keys.file import FileKeyProvider
from im.backends.keys.keyring import Keyring
from im.backends.sql.postgres_db import PostgresDatabase
from im.model.chat import StoredMessage


async def main(dsn: str, schema: str, key_file: str, convs: list[str]) -> None:
    db = PostgresDatabase(dsn, schema=schema, min_size=1, max_size=8)
    keyring = Keyring(FileKeyProvider(Path(key_file), create=False), PostgresConversationKeys(db))
    async with EncryptedChatStore(PostgresChatStore(db), keyring, owns_keyring=True) as store:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.readline()  # go: both processes create the keys at the same moment
        sealed = await asyncio.gather(
            *(store.seal([StoredMessage(c, 1, 1, 1, "d", "c", 1, "text", b'"from the peer"')]) for c in convs)
        )
        print(json.dumps({c: s[0].body.hex() for c, s in zip(convs, sealed, strict=True)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))
