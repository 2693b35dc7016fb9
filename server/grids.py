"""Wrappers around the Flower Grid the coordinator talks to the sites through.

- `PackingGrid`: each message's content travels as one packed record (`federation.packing`).
- `PollingGrid`: deployment; polls for replies soon after each came, backing off to
  `federation.poll_interval` seconds.
- `MeteredGrid`: counts the bytes a round moves and keeps the sites' error replies.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from federation.packing import pack_content, unpack_content

__all__ = ["DelegatingGrid", "MeteredGrid", "PackingGrid", "PollingGrid"]


class DelegatingGrid(Grid):
    """A Grid that hands every call to `inner`; subclasses change what they need."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    @property
    def run(self) -> Any:  # noqa: D102
        return self.inner.run

    def set_run(self, run_id: Any) -> None:  # noqa: D102
        self.inner.set_run(run_id)

    @property
    def identities(self) -> dict[int, str]:
        """Registered site of each node id, where a wrapped grid knows them (`server.members`)."""
        return dict(getattr(self.inner, "identities", {}))

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.inner.pull_messages(message_ids)

    def send_and_receive(  # noqa: D102
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


def _unpacked(reply: Message) -> Message:
    """`reply` with its arrays unpacked; an error reply if they do not unpack."""
    if not reply.has_content():
        return reply
    try:
        reply.content = unpack_content(reply.content)
    except ValueError as err:
        reply.__dict__["_content"] = None  # Flower lets a message hold content or an error
        reply.error = Error(code=ErrorCode.UNKNOWN, reason=f"rejected reply: {err}")
    return reply


class PackingGrid(DelegatingGrid):
    """Sends every ArrayRecord packed into one array and unpacks the replies."""

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.inner.push_messages(self._packed(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return [_unpacked(r) for r in self.inner.pull_messages(message_ids)]

    def send_and_receive(  # noqa: D102
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = self.inner.send_and_receive(self._packed(messages), timeout=timeout)
        return [_unpacked(r) for r in replies]

    @staticmethod
    def _packed(messages: Iterable[Message]) -> list[Message]:
        out = list(messages)
        for msg in out:
            if msg.has_content():
                msg.content = pack_content(msg.content)
        return out


class PollingGrid(DelegatingGrid):
    """A Grid whose `send_and_receive` polls for replies, soon after each one came.

    Flower's deployment Grid sleeps a fixed 3 s between polls; every round waits on
    two exchanges (train, evaluate). Here the wait starts at `first` seconds after a
    reply came (the sites' replies come close together) and doubles up to `cap` while
    none comes: the SuperLink, which answers every poll, is not asked ten times a
    second through a long local training.
    """

    def __init__(self, inner: Grid, *, first: float = 0.05, cap: float = 0.25) -> None:
        super().__init__(inner)
        self.first = first
        self.cap = cap

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push messages and collect the replies until all came or `timeout` passed."""
        pending = set(self.inner.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        wait = self.first
        while pending and (timeout is None or time.time() < end):
            got = list(self.inner.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending:
                wait = self.first if got else min(self.cap, wait * 2)
                time.sleep(wait)
        return replies


def _size(msg: Message) -> int:
    return recorddict_to_proto(msg.content).ByteSize() if msg.has_content() else 0


class MeteredGrid(DelegatingGrid):
    """A grid that counts the serialised bytes of message contents sent and received.

    Also keeps, per node, the reason of the last error reply (a site that dropped out).
    """

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.sent = 0
        self.received = 0
        self.received_from: dict[int, int] = {}  # node id -> bytes
        self.errors: dict[int, str] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Count and delegate."""
        messages = list(messages)
        self.sent += sum(_size(m) for m in messages)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate and count."""
        replies = list(self.inner.pull_messages(message_ids))
        self._count(replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Count both ways and delegate."""
        messages = list(messages)
        self.sent += sum(_size(m) for m in messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self._count(replies)
        return replies

    def _count(self, replies: list[Message]) -> None:
        for reply in replies:
            size = _size(reply)
            self.received += size
            node = reply.metadata.src_node_id
            self.received_from[node] = self.received_from.get(node, 0) + size
            if reply.has_error():
                self.errors[reply.metadata.src_node_id] = reply.error.reason or "unknown error"

    def reset(self) -> None:
        """Start counting afresh."""
        self.sent = self.received = 0
        self.received_from = {}
        self.errors = {}
