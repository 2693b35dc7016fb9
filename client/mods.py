"""Flower mods of the site agent."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from federation import keys
from federation.packing import is_packed, pack_content, unpack_content

__all__ = ["central_clipping_mod", "packed_content_mod"]


def central_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the site's update with Flower's `fixedclipping_mod` when the coordinator asks.

    Only replies that carry an update are clipped; a refusal passes through unchanged, so
    its reason still reaches the coordinator.
    """
    reply = call_next(msg, context)
    config = msg.content.config_records.get(keys.CONFIG)
    if config is None or KEY_CLIPPING_NORM not in config or reply.has_error():
        return reply
    if keys.ARRAYS not in reply.content.array_records:
        return reply
    return fixedclipping_mod(msg, context, lambda _msg, _ctx: reply)


def packed_content_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Site side: unpack what arrived packed, and pack the reply to it."""
    if not (msg.has_content() and is_packed(msg.content)):
        return call_next(msg, context)
    msg.content = unpack_content(msg.content)
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content = pack_content(reply.content)
    return reply
