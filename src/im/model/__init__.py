"""The domain model: the data every layer passes around and the error vocabulary.

It depends on nothing else in im: the protocol, the core, the transports and the storage adapters all
import it, and it imports none of them."""
