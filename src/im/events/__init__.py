"""The durable event pipeline: committed messages -> outbox -> RabbitMQ -> push webhook.

::

    ChatStore.commit ──(same transaction)──> outbox table
    OutboxRelay: fetch oldest ─> publish (persistent, confirmed) ─> delete published ids
    RabbitMQ: exchange im.events (topic, durable) ─> quorum queue im.push
    PushConsumer: members - sender - online devices ─> content-free webhook, deduplicated by mid

Delivery is at least once end to end (a crash between publish and delete republishes; a crash between
webhook and ack redelivers); the consumer deduplicates by message id and the webhook carries
``Idempotency-Key: <mid>`` for the window the dedupe record cannot cover.
"""
