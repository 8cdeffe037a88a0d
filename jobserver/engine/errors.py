"""ERROR packet codes and texts (shared doc §3.13).

Codes are libgearman return names without the GEARMAN_ prefix, so existing clients map them to
their own constants. Where gearmand answers, we answer with its exact code and text; where it is
silent or closes the connection (§3.14), we send one of the extra errors below instead, so a
client matching replies FIFO never desynchronises.
"""

ErrorReply = tuple[bytes, bytes]

# As gearmand 1.1.20 sends them.
INVALID_MAGIC: ErrorReply = (b"INVALID_MAGIC", b"Request magic expected")
INVALID_COMMAND: ErrorReply = (b"INVALID_COMMAND", b"Command not expected")
UNIQUE_TOO_LARGE: ErrorReply = (b"ARGUMENT_TOO_LARGE", b"Unique value too large")
QUEUE_FULL: ErrorReply = (b"QUEUE_ERROR", b"Job queue is full")
UNKNOWN_OPTION: ErrorReply = (b"UNKNOWN_OPTION", b"Server does not recognize given option")
RESULT_FOR_UNKNOWN_JOB: ErrorReply = (b"JOB_NOT_FOUND", b"Job given in work result not found")
DATA_FOR_UNKNOWN_JOB: ErrorReply = (b"JOB_NOT_FOUND", b"Job does not exist on server")
EXCEPTION_FOR_UNKNOWN_JOB: ErrorReply = (
    b"JOB_NOT_FOUND",
    b"An exception was received for a job that does not exist",
)

# Ours: gearmand gives no reply at all for these (§3.14) or misreads the packet.
HANDLE_TOO_LARGE: ErrorReply = (b"ARGUMENT_TOO_LARGE", b"Job handle too large")
UNIQUE_LOOKUP_TOO_LARGE: ErrorReply = (b"ARGUMENT_TOO_LARGE", b"Unique value too large")
BAD_EPOCH: ErrorReply = (b"INVALID_ARGUMENT", b"Epoch must be a decimal unix time in range")
TOO_MANY_LISTENERS: ErrorReply = (
    b"QUEUE_ERROR",
    b"Too many clients are waiting on this job",
)
