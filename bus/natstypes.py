"""The NATS client's types that code above the bus handles, named here once.

Only ``bus`` imports ``nats`` (an import-linter contract): the runtime receives
messages, catches errors and holds a key-value bucket through these names, so a
change of client touches ``bus`` alone.
"""

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.errors import Error as JetStreamError
from nats.js.kv import KeyValue

__all__ = ["BucketNotFoundError", "JetStreamContext", "JetStreamError", "KeyValue", "Msg",
           "NatsError", "NotFoundError"]
