"""Shared pieces of mlfleet: errors, units, wire protocol, messages, sockets and the client."""

PROTOCOL_VERSION = 2
