"""What nats-server requires of the streams' settings, without importing nats.

The fleet file is validated against these (``runtime.model.formats``) so that a
setting the server would refuse is an error with a line number, not a bus that
will not start.
"""

from __future__ import annotations

from datetime import timedelta

# Long enough that a message republished from a journal after a reconnect, or by a
# retrying publisher, is still recognised by its Nats-Msg-Id and stored once.
DUPLICATE_WINDOW = timedelta(minutes=10)

MIN_STREAM_AGE = timedelta(milliseconds=100)
"""The shortest max age nats-server accepts for a stream."""
