"""What the worker SDK and the client SDK share: one connection layer on jobserver.protocol,
server addresses, reconnect backoff, payload codecs and the SDK exceptions."""
