"""What a generated message says: its Graph JSON, computed from (seed, mailbox, index).

The same (seed, mailbox, index) always gives the same message; its folder and
how often it was edited are the only state that changes it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import random
import re
from datetime import datetime, timedelta
from typing import Any

PROPERTIES = (
    "createdDateTime",
    "lastModifiedDateTime",
    "changeKey",
    "categories",
    "receivedDateTime",
    "sentDateTime",
    "hasAttachments",
    "internetMessageId",
    "subject",
    "bodyPreview",
    "importance",
    "parentFolderId",
    "conversationId",
    "isDeliveryReceiptRequested",
    "isReadReceiptRequested",
    "isRead",
    "isDraft",
    "webLink",
    "inferenceClassification",
    "body",
    "sender",
    "from",
    "toRecipients",
    "ccRecipients",
    "bccRecipients",
    "replyTo",
    "flag",
)

_NAMES = (
    "Megan Bowen",
    "Adele Vance",
    "Zoë Brontë",
    "José Álvarez",
    "Łukasz Żółć",
    "田中 太郎",
    "Олена Коваленко",
    "محمد علي",
    "Søren Kierkegård",
    "Nguyễn Thị Hồng",
    "O'Brien, Siobhán",
    "",
)
# The local part of each name's address ("" for the name that has none).
_LOCAL_PARTS = {name: re.sub(r"[^a-z]", "", name.lower()) for name in _NAMES}
_IMPORTANCE = ("normal", "high", "low")
_IMPORTANCE_WEIGHTS = tuple(itertools.accumulate((90, 7, 3)))
_FLAGS = ("notFlagged", "flagged", "complete")
_FLAG_WEIGHTS = tuple(itertools.accumulate((85, 10, 5)))
_DOMAINS = ("contoso.com", "fabrikam.example", "例え.jp", "tailspin.example")
_SUBJECTS = (
    "Quarterly report",
    "Lunch on Friday?",
    "Invoice #{n}",
    "Your order has shipped",
    "Réunion de l'équipe — ordre du jour",
    "会議の議事録",
    "Отчёт за неделю",
    "Happy birthday 🎉🎂",
    "مرحبا بالعالم",
    "Re: Re: Fwd: contract draft v{n}",
    "MyAnalytics | Your past week",
    "",
)
_WORDS = (
    "the meeting moved to Thursday",
    "please find the figures attached",
    "thanks for your help",
    "see the notes below",
    "naïve café déjà vu",
    "ありがとうございます",
    "🚀 launch checklist",
    "let me know what you think",
)


def digest(seed: int, mailbox: str, key: int | str, salt: str = "") -> bytes:
    """24 bytes that stand for (seed, mailbox, key, salt): a message's, a thread's, a folder's."""
    return hashlib.blake2b(
        f"{seed}\x00{mailbox}\x00{key}\x00{salt}".encode(), digest_size=24
    ).digest()


def message_id(message_digest: bytes) -> str:
    """The Graph id of the message whose digest this is."""
    return "AAMkAG" + base64.urlsafe_b64encode(message_digest).decode().rstrip("=")


def graph_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def message(
    seed: int,
    mailbox: str,
    index: int,
    received: datetime,
    *,
    folder_id: str,
    edits: int = 0,
) -> dict[str, Any]:
    """Message `index` of the mailbox as Graph's JSON, every property.

    An edited message (edits > 0) has a new changeKey and etag, a later
    lastModifiedDateTime (a minute per edit), isRead flipped by each edit and
    the category "Edit {edits}"; the rest of it stays as generated.
    """
    own = digest(seed, mailbox, index)
    rng = random.Random(int.from_bytes(own[8:]))
    sent = received - timedelta(seconds=rng.randrange(1, 300))
    the_id = message_id(own)

    # Consecutive messages form threads of up to four: one conversation, one subject.
    thread = index // 4
    in_thread, thread_subject, thread_conversation = _thread(seed, mailbox, thread)
    if in_thread:
        subject: str | None = thread_subject
        if index % 4:
            subject = f"RE: {subject}"
        conversation_id = thread_conversation
    else:
        subject = rng.choice(_SUBJECTS).format(n=rng.randrange(1000))
        conversation_id = _conversation_id(seed, mailbox, f"m{index}")

    is_draft = rng.random() < 0.02
    sender = None if is_draft and rng.random() < 0.5 else _recipient(rng)
    html = rng.random() < 0.7
    paragraphs = [rng.choice(_WORDS) for _ in range(rng.randrange(0, 6))]
    if rng.random() < 0.003:
        paragraphs.append("x" * 200_000)  # an occasional very long message
    text = "\r\n\r\n".join(paragraphs)
    content = (
        f'<html><head><meta charset="utf-8"></head><body>'
        f"{''.join(f'<p>{p}</p>' for p in paragraphs)}</body></html>"
        if html
        else text
    )
    # Real mailboxes hold text PostgreSQL cannot store as is.
    if rng.random() < 0.01:
        content = content[: len(content) // 2] + "\x00" + content[len(content) // 2 :]
    if subject is not None and rng.random() < 0.005:
        subject += "\x00"
    if subject is not None and rng.random() < 0.003:
        subject += "\ud83d"  # half of a surrogate pair
    if rng.random() < 0.02:
        subject = None

    received_text = graph_time(received)
    document = {
        "@odata.etag": f'W/"{base64.b64encode(own[:12]).decode()}"',
        "id": the_id,
        "createdDateTime": received_text,
        "lastModifiedDateTime": received_text,
        "changeKey": base64.b64encode(own[:16]).decode(),
        "categories": ["Blue category"] if rng.random() < 0.05 else [],
        "receivedDateTime": received_text,
        "sentDateTime": graph_time(sent),
        "hasAttachments": rng.random() < 0.2,
        "internetMessageId": f"<{own[:10].hex()}@{rng.choice(_DOMAINS)}>",
        "subject": subject,
        "bodyPreview": text[:255],
        "importance": rng.choices(_IMPORTANCE, cum_weights=_IMPORTANCE_WEIGHTS)[0],
        "parentFolderId": folder_id,
        "conversationId": conversation_id,
        "isDeliveryReceiptRequested": False,
        "isReadReceiptRequested": rng.random() < 0.05,
        "isRead": rng.random() < 0.6,
        "isDraft": is_draft,
        "webLink": f"https://outlook.office365.com/owa/?ItemID={the_id}",
        "inferenceClassification": rng.choice(("focused", "other")),
        "body": {"contentType": "html" if html else "text", "content": content},
        "sender": sender,
        "from": sender,
        "toRecipients": [_recipient(rng) for _ in range(rng.randrange(0, 4))],
        "ccRecipients": [_recipient(rng) for _ in range(rng.choice((0, 0, 0, 1, 2)))],
        "bccRecipients": [_recipient(rng)] if rng.random() < 0.03 else [],
        "replyTo": [],
        "flag": {"flagStatus": rng.choices(_FLAGS, cum_weights=_FLAG_WEIGHTS)[0]},
    }
    if edits:
        _apply_edits(
            document, seed=seed, mailbox=mailbox, index=index, received=received, edits=edits
        )
    return document


@functools.lru_cache(maxsize=4096)
def _thread(seed: int, mailbox: str, thread: int) -> tuple[bool, str, str]:
    """Whether the four messages of a thread are one conversation, and if so its
    subject and conversation id (kept: a thread's messages are often read together)."""
    thread_rng = random.Random(int.from_bytes(digest(seed, mailbox, thread, "thread")))
    if thread_rng.random() >= 0.4:
        return False, "", ""
    subject = thread_rng.choice(_SUBJECTS).format(n=thread_rng.randrange(1000))
    return True, subject, _conversation_id(seed, mailbox, f"t{thread}")


def _conversation_id(seed: int, mailbox: str, key: str) -> str:
    return (
        "AAQkAG"
        + hashlib.blake2b(f"{seed}\x00{mailbox}\x00{key}".encode(), digest_size=12).hexdigest()
    )


def _apply_edits(
    document: dict[str, Any],
    *,
    seed: int,
    mailbox: str,
    index: int,
    received: datetime,
    edits: int,
) -> None:
    edited = digest(seed, mailbox, index, f"edit:{edits}")
    document["@odata.etag"] = f'W/"{base64.b64encode(edited[:12]).decode()}"'
    document["changeKey"] = base64.b64encode(edited[:16]).decode()
    document["lastModifiedDateTime"] = graph_time(received + timedelta(minutes=edits))
    document["isRead"] = document["isRead"] != (edits % 2 == 1)
    document["categories"] = [*document["categories"], f"Edit {edits}"]


def _recipient(rng: random.Random) -> dict[str, Any]:
    name = rng.choice(_NAMES)
    local = _LOCAL_PARTS[name] or f"user{rng.randrange(100)}"
    return {"emailAddress": {"name": name, "address": f"{local}@{rng.choice(_DOMAINS)}"}}
