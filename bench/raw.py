"""Protobuf wire bytes read without decoding them: what the load's readers need, as cheaply as it can be had,
so that their CPU does not stand in for the sidecar's in the figures."""

from __future__ import annotations


def count_batch_entries(raw: bytes) -> int:
    """Events in an encoded GuardEventBatch: walk its field-1 entries by their lengths, decoding nothing."""
    entries = position = 0
    while position < len(raw):
        position += 1  # the tag of field 1, length-delimited: 0x0a
        length, position = varint(raw, position)
        position += length
        entries += 1
    return entries


def top_fields(raw: bytes) -> dict[int, int]:
    """A HoldResponse's varint fields (outcome, event, position), stepping over the guard without decoding it."""
    fields: dict[int, int] = {}
    at = 0
    while at < len(raw):
        tag, at = varint(raw, at)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            fields[number], at = varint(raw, at)
        elif wire_type == 2:
            length, at = varint(raw, at)
            at += length
        else:
            raise ValueError(f"HoldResponse field {number} has wire type {wire_type}")
    return fields


def varint(raw: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at
