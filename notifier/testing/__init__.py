"""Test harness for code that uses notifier: import it in your own tests.

`SmtpSink` is a real SMTP server on loopback that records what it accepts
and can be told to be slow or to refuse messages.
"""

from notifier.testing.smtp import (
    ReceivedEnvelopeInfo,
    ReceivedMessage,
    RefusedMessage,
    SmtpSink,
    free_port,
)

__all__ = ["ReceivedEnvelopeInfo", "ReceivedMessage", "RefusedMessage", "SmtpSink", "free_port"]
