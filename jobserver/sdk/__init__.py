"""What the worker SDK and the client SDK share: one connection layer on jobserver.protocol,
server addresses, reconnect backoff, payload codecs, the SDK exceptions, admin text commands
(admin.py) and the wire form of retry policies and retry requests (retry.py, which the server
reads too)."""
