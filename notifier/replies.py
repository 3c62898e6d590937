"""What an SMTP reply means for the message and for the sender.

Pure: a reply code and its text in, a class out. The mailer raises the
matching :mod:`notifier.errors` exception; the worker acts on the class:

==============  ============================================  ===============================
class           replies                                        what follows
==============  ============================================  ===============================
``THROTTLED``   421; 454; any 4xx with an enhanced code        the sender slows down; the
                4.7.x; any other 4xx (but 4.2.x, the           message is tried again without
                mailbox's own) whose text speaks of a rate,    using up an attempt
                throttling, too many messages or a quota
``TRANSIENT``   any other 4xx                                  the message is deferred and
                                                               retried on the schedule
``PERMANENT``   5xx                                            the message is dead-lettered
==============  ============================================  ===============================

A reply that fits no class (a 2xx or 3xx where a refusal was expected, or a
code out of range) is taken as transient: nothing is dead-lettered on a
misunderstanding.

A temporary refusal that says it is greylisting (:func:`is_greylisting`)
is about that one recipient, by design, whatever its code: it is
``TRANSIENT``, and never counts towards a relay outage, however many new
recipients a backlog holds.
"""

from __future__ import annotations

import enum
import re

# RFC 3463 enhanced status code at the start of the text: class.subject.detail.
_ENHANCED = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
# Words relays use when they refuse because of a rate or a quota (Amazon SES:
# "454 Throttling failure: Maximum sending rate exceeded"; Microsoft: "451
# 4.7.500 Server busy"; Postfix anvil: "421 4.7.0 Error: too many connections").
_RATE_WORDS = re.compile(
    r"\brates?\b|throttl|too many|quota|try again later.*(messages|connections)|slow down",
    re.IGNORECASE,
)


_GREYLIST_WORDS = re.compile(r"grey.?list|gray.?list", re.IGNORECASE)


class ReplyClass(enum.Enum):
    THROTTLED = "throttled"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


def enhanced_code(text: str) -> tuple[int, int, int] | None:
    """The RFC 3463 enhanced status code that starts ``text``, if any.

    >>> enhanced_code("4.7.1 Greylisted, try again"), enhanced_code("Greylisted")
    ((4, 7, 1), None)
    """
    match = _ENHANCED.match(text)
    if match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3])


def classify(code: int, text: str = "") -> ReplyClass:
    """The class of an SMTP refusal.

    >>> classify(550, "5.1.1 no such user").name
    'PERMANENT'
    >>> classify(451, "4.3.5 Server configuration problem").name
    'TRANSIENT'
    >>> [classify(c, t).name for c, t in [(421, "closing"), (454, "Throttling failure"),
    ...     (451, "4.7.1 slow down"), (450, "too many messages, try later")]]
    ['THROTTLED', 'THROTTLED', 'THROTTLED', 'THROTTLED']
    """
    if 500 <= code <= 599:
        return ReplyClass.PERMANENT
    if not 400 <= code <= 499:
        return ReplyClass.TRANSIENT
    if is_greylisting(text):
        # "451 4.7.1 Greylisting in action": about this recipient, whatever
        # the code says; slowing everyone down would not make it pass sooner.
        return ReplyClass.TRANSIENT
    if code in (421, 454):
        return ReplyClass.THROTTLED
    enhanced = enhanced_code(text)
    if enhanced is not None and enhanced[:2] == (4, 7):
        return ReplyClass.THROTTLED
    if enhanced is not None and enhanced[:2] == (4, 2):
        return ReplyClass.TRANSIENT  # the mailbox's own trouble ("over quota"), not our pace
    if _RATE_WORDS.search(text):
        return ReplyClass.THROTTLED
    return ReplyClass.TRANSIENT


def is_greylisting(text: str) -> bool:
    """Whether a refusal says it is greylisting (postgrey, Postfix policy servers, rspamd).

    >>> is_greylisting("450 4.2.0 Recipient address rejected: Greylisted, see ...")
    True
    >>> is_greylisting("451 4.3.5 Server configuration problem")
    False
    """
    return _GREYLIST_WORDS.search(text) is not None


def describe(code: int, text: str) -> str:
    """A reply as one short line for documents and logs (no line breaks, bounded).

    >>> describe(451, "4.3.5 Server configuration\\r\\nproblem")
    '451 4.3.5 Server configuration problem'
    """
    flat = " ".join(text.split())
    return f"{code} {flat}"[:300].strip()
