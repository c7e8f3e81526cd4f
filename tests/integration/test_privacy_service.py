"""The privacy service as a real process over real gRPC, beside a real kernel.

`llmos serve kernel` and `llmos serve privacy` run as child processes on free ports with
their own data directory (key file and vault made on first start); the tests call the
PrivacyService as the kernel does, with the real spaCy model and real AES-GCM keys, and read
the vault's raw bytes.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from stacktools import Served

from llmos.services.errors import error_info
from llmos.v1 import privacy_pb2, privacy_pb2_grpc

PRIVACY_OFFSET = 3
DATA = Path(__file__).resolve().parents[2] / "bench/data"
TEXT = (
    "Hi, I'm Zoë Martin 🙂, write to zoe.martin@example.org or call +1 212-555-0187. "
    "My card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00, SSN 219-09-9999."
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    processes = Served(tmp_path_factory.mktemp("privacy"), {"LLMOS_METRICS_PORT": "-1"})
    try:
        processes.start("kernel")
        processes.start("privacy")
        processes.wait_registered("privacy", timeout_s=90)
        yield processes
    finally:
        processes.stop()


@pytest.fixture
def privacy(served: Served) -> Iterator[privacy_pb2_grpc.PrivacyServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{served.port + PRIVACY_OFFSET}") as channel:
        yield privacy_pb2_grpc.PrivacyServiceStub(channel)


def redact(
    stub: privacy_pb2_grpc.PrivacyServiceStub,
    text: str,
    operator: int = privacy_pb2.REDACTION_OPERATOR_PSEUDONYMIZE,
    *,
    tenant: str = "acme",
    conversation: str = "c1",
) -> privacy_pb2.PrivacyServiceRedactResponse:
    request = privacy_pb2.PrivacyServiceRedactRequest(
        text=text, tenant=tenant, conversation_id=conversation, operator=operator
    )
    reply: privacy_pb2.PrivacyServiceRedactResponse = stub.Redact(request, timeout=30)
    return reply


def restore(
    stub: privacy_pb2_grpc.PrivacyServiceStub, text: str, tenant: str = "acme", conv: str = "c1"
) -> str:
    request = privacy_pb2.PrivacyServiceRestoreRequest(
        text=text, tenant=tenant, conversation_id=conv
    )
    reply: privacy_pb2.PrivacyServiceRestoreResponse = stub.Restore(request, timeout=30)
    return reply.text


def refused(call: object, *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=30)  # type: ignore[operator]
    return caught.value


def test_detect_finds_every_type_with_character_offsets_and_reasons(
    privacy: privacy_pb2_grpc.PrivacyServiceStub,
) -> None:
    reply = privacy.Detect(privacy_pb2.PrivacyServiceDetectRequest(text=TEXT), timeout=30)
    found = {(e.type, TEXT[e.start : e.end]) for e in reply.entities}

    assert found == {
        ("PERSON", "Zoë Martin"),
        ("EMAIL_ADDRESS", "zoe.martin@example.org"),
        ("PHONE_NUMBER", "+1 212-555-0187"),
        ("CREDIT_CARD", "4111 1111 1111 1111"),
        ("IBAN_CODE", "DE89 3704 0044 0532 0130 00"),
        ("US_SSN", "219-09-9999"),
    }
    by_type = {e.type: e for e in reply.entities}
    assert "Luhn" in by_type["CREDIT_CARD"].explanation
    assert "mod-97" in by_type["IBAN_CODE"].explanation
    assert "'ssn'" in by_type["US_SSN"].explanation  # the context word that raised it
    assert by_type["PERSON"].recognizer == "spacy_ner"
    assert all(0 < e.score <= 1 for e in reply.entities)


def test_pseudonyms_are_consistent_in_a_conversation_and_restore_exactly(
    privacy: privacy_pb2_grpc.PrivacyServiceStub,
) -> None:
    first = redact(privacy, TEXT, conversation="conv-a")
    assert "Zoë" not in first.text and "4111" not in first.text
    assert "<PERSON_1>" in first.text and "<EMAIL_ADDRESS_1>" in first.text
    assert restore(privacy, first.text, conv="conv-a") == TEXT

    again = redact(privacy, "Zoë Martin met Omar Haddad in Lisbon.", conversation="conv-a")
    assert again.text.startswith("<PERSON_1> met <PERSON_2> in <LOCATION_1>")
    other = redact(privacy, "Omar Haddad called.", conversation="conv-b")
    assert other.text == "<PERSON_1> called."  # numbering is per conversation
    # The model's answer mixes both turns' placeholders: each goes back to its value.
    answer = "Tell <PERSON_2> that <PERSON_1> paid with <CREDIT_CARD_1>; <PERSON_9> is unknown."
    assert restore(privacy, answer, conv="conv-a") == (
        "Tell Omar Haddad that Zoë Martin paid with 4111 1111 1111 1111; <PERSON_9> is unknown."
    )


def test_concurrent_calls_share_batches_and_each_gets_its_own_answer(
    privacy: privacy_pb2_grpc.PrivacyServiceStub,
) -> None:
    """The service detects concurrent calls in micro-batches (services/privacy/batching.py):
    64 calls in flight at once get what each gets alone, and concurrent pseudonymizing
    Redacts each restore to their own text."""
    rows = (DATA / "privacy-test.jsonl").read_text(encoding="utf-8").splitlines()
    texts = list(dict.fromkeys(json.loads(row)["text"] for row in rows))[:64]

    def entities(reply: privacy_pb2.PrivacyServiceDetectResponse) -> list[tuple[str, int, int]]:
        return [(e.type, e.start, e.end) for e in reply.entities]

    alone = [
        entities(privacy.Detect(privacy_pb2.PrivacyServiceDetectRequest(text=t), timeout=30))
        for t in texts
    ]
    assert sum(map(len, alone)) > len(texts) // 2  # the texts hold PII to find
    calls = [
        privacy.Detect.future(privacy_pb2.PrivacyServiceDetectRequest(text=t), timeout=60)
        for t in texts
    ]
    assert [entities(call.result()) for call in calls] == alone

    redactions = [
        privacy.Redact.future(
            privacy_pb2.PrivacyServiceRedactRequest(
                text=t,
                tenant="acme",
                conversation_id=f"batch-{i}",
                operator=privacy_pb2.REDACTION_OPERATOR_PSEUDONYMIZE,
            ),
            timeout=60,
        )
        for i, t in enumerate(texts)
    ]
    redacted = [call.result() for call in redactions]
    assert [[(e.type, e.start, e.end) for e in r.entities] for r in redacted] == alone
    for i, (text, reply) in enumerate(zip(texts, redacted, strict=True)):
        assert restore(privacy, reply.text, conv=f"batch-{i}") == text


def test_redact_takes_out_only_the_types_asked_for_and_still_round_trips(
    privacy: privacy_pb2_grpc.PrivacyServiceStub,
) -> None:
    """The kernel's default leaves places to the model: with entity_types named, the other
    findings stay in the text and out of the reply, and the round trip is still exact."""
    text = "Zoë Martin (zoe@example.org) asks: what is the capital of France?"
    request = privacy_pb2.PrivacyServiceRedactRequest(
        text=text, tenant="acme", conversation_id="typed", entity_types=["PERSON", "EMAIL_ADDRESS"]
    )
    reply = privacy.Redact(request, timeout=30)
    assert reply.text == ("<PERSON_1> (<EMAIL_ADDRESS_1>) asks: what is the capital of France?")
    assert sorted(e.type for e in reply.entities) == ["EMAIL_ADDRESS", "PERSON"]
    assert restore(privacy, reply.text, conv="typed") == text
    # Empty means every type, as before.
    every = redact(privacy, text, conversation="typed-all")
    assert "<LOCATION_1>" in every.text and "France" not in every.text

    unknown = refused(
        privacy.Redact,
        privacy_pb2.PrivacyServiceRedactRequest(
            text=text, tenant="acme", conversation_id="typed", entity_types=["PERSON", "EMAIL"]
        ),
    )
    info = error_info(unknown)
    assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info is not None and info.reason == "UNKNOWN_ENTITY_TYPE"
    assert "'EMAIL'" in (unknown.details() or "")


def test_mask_replace_and_hash_are_irreversible_and_hash_is_keyed_per_tenant(
    privacy: privacy_pb2_grpc.PrivacyServiceStub,
) -> None:
    text = "Mail ann.lee@example.com now."
    masked = redact(privacy, text, privacy_pb2.REDACTION_OPERATOR_MASK).text
    assert masked == "Mail " + "*" * len("ann.lee@example.com") + " now."
    replaced = redact(privacy, text, privacy_pb2.REDACTION_OPERATOR_REPLACE).text
    assert replaced == "Mail <EMAIL_ADDRESS> now."

    hashed = redact(privacy, text, privacy_pb2.REDACTION_OPERATOR_HASH).text
    assert hashed == redact(privacy, text, privacy_pb2.REDACTION_OPERATOR_HASH).text
    other_tenant = redact(privacy, text, privacy_pb2.REDACTION_OPERATOR_HASH, tenant="globex")
    assert hashed.startswith("Mail <EMAIL_ADDRESS:") and hashed != other_tenant.text
    assert restore(privacy, hashed, conv="") == hashed


def test_encrypt_round_trips_and_rejects_tampering_and_other_tenants(
    privacy: privacy_pb2_grpc.PrivacyServiceStub,
) -> None:
    sealed = redact(privacy, TEXT, privacy_pb2.REDACTION_OPERATOR_ENCRYPT).text
    assert "<ENC:PERSON:k1:" in sealed and "Zoë" not in sealed
    assert restore(privacy, sealed, conv="") == TEXT

    start = sealed.index("<ENC:CREDIT_CARD:k1:") + len("<ENC:CREDIT_CARD:k1:") + 20
    flipped = "A" if sealed[start] != "A" else "B"
    tampered = sealed[:start] + flipped + sealed[start + 1 :]
    request = privacy_pb2.PrivacyServiceRestoreRequest(text=tampered, tenant="acme")
    error = refused(privacy.Restore, request)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(error).reason == "CIPHERTEXT_REJECTED"  # type: ignore[union-attr]
    assert "4111" not in (error.details() or "")

    foreign = privacy_pb2.PrivacyServiceRestoreRequest(text=sealed, tenant="globex")
    assert refused(privacy.Restore, foreign).code() == grpc.StatusCode.PERMISSION_DENIED

    unknown_key = sealed.replace("<ENC:PERSON:k1:", "<ENC:PERSON:k9:")
    missing = refused(
        privacy.Restore, privacy_pb2.PrivacyServiceRestoreRequest(text=unknown_key, tenant="acme")
    )
    assert missing.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(missing).reason == "KEY_NOT_FOUND"  # type: ignore[union-attr]


def test_restore_stream_puts_back_placeholders_split_across_chunks(
    privacy: privacy_pb2_grpc.PrivacyServiceStub,
) -> None:
    redacted = redact(privacy, "Ask Zoë Martin at zoe.martin@example.org.", conversation="s1").text
    assert redacted == "Ask <PERSON_1> at <EMAIL_ADDRESS_1>."
    chunks = ["Ask <PE", "RSON", "_1> at <", "EMAIL_ADDRESS_", "1", ">.", " Bye <", "3"]

    def requests() -> Iterator[privacy_pb2.PrivacyServiceRestoreStreamRequest]:
        yield privacy_pb2.PrivacyServiceRestoreStreamRequest(
            tenant="acme", conversation_id="s1", text=chunks[0]
        )
        for chunk in chunks[1:]:
            yield privacy_pb2.PrivacyServiceRestoreStreamRequest(text=chunk)

    replies = [reply.text for reply in privacy.RestoreStream(requests(), timeout=30)]
    assert "".join(replies) == "Ask Zoë Martin at zoe.martin@example.org. Bye <3"
    assert replies[:3] == ["Ask ", "", "Zoë Martin at "]  # "<PE" was held, then released


def test_bad_input_gets_the_right_status_and_the_service_keeps_serving(
    served: Served, privacy: privacy_pb2_grpc.PrivacyServiceStub
) -> None:
    def reason(error: grpc.RpcError) -> str:
        info = error_info(error)
        return "" if info is None else info.reason

    empty = refused(privacy.Detect, privacy_pb2.PrivacyServiceDetectRequest(text=""))
    assert (empty.code(), reason(empty)) == (grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_TEXT")
    huge = refused(privacy.Detect, privacy_pb2.PrivacyServiceDetectRequest(text="a" * 1_000_000))
    assert (huge.code(), reason(huge)) == (grpc.StatusCode.INVALID_ARGUMENT, "TEXT_TOO_LONG")

    unknown = refused(
        privacy.Restore,
        privacy_pb2.PrivacyServiceRestoreRequest(text="<PERSON_1>", conversation_id="never"),
    )
    assert (unknown.code(), reason(unknown)) == (
        grpc.StatusCode.NOT_FOUND,
        "CONVERSATION_NOT_FOUND",
    )
    redact(privacy, "Zoë Martin", conversation="owned")
    foreign = refused(
        privacy.Restore,
        privacy_pb2.PrivacyServiceRestoreRequest(
            text="<PERSON_1>", tenant="globex", conversation_id="owned"
        ),
    )
    assert (foreign.code(), reason(foreign)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "FOREIGN_CONVERSATION",
    )
    no_conversation = refused(
        privacy.Redact, privacy_pb2.PrivacyServiceRedactRequest(text="Zoë Martin", tenant="acme")
    )
    assert no_conversation.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Invalid UTF-8 in a string field, sent as raw bytes (a stub would refuse to send it).
    with grpc.insecure_channel(f"127.0.0.1:{served.port + PRIVACY_OFFSET}") as channel:
        raw = channel.unary_unary("/llmos.v1.PrivacyService/Detect")
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\x0a\x03\xff\xfe\xfd", timeout=10)
        streamed = channel.stream_stream("/llmos.v1.PrivacyService/RestoreStream")
        with pytest.raises(grpc.RpcError) as caught_stream:
            list(streamed(iter([b"\x1a\x02\xc3\x28"]), timeout=10))
    assert (caught.value.code(), reason(caught.value)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
    )
    assert caught_stream.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    reply = privacy.Detect(privacy_pb2.PrivacyServiceDetectRequest(text=TEXT), timeout=30)
    assert len(reply.entities) == 6  # still serving, and still right


def test_the_vault_and_key_file_hold_no_plaintext(
    served: Served, privacy: privacy_pb2_grpc.PrivacyServiceStub
) -> None:
    secret = "Quentin Abernathy-Vole"
    assert "<PERSON_1>" in redact(privacy, f"{secret} signed.", conversation="raw").text
    privacy_dir = served.workdir / "data" / "privacy"
    raw = b"".join(path.read_bytes() for path in privacy_dir.iterdir() if path.is_file())
    assert secret.encode() not in raw and b"Quentin" not in raw
    assert b"Zo\xc3\xab" not in raw and b"4111" not in raw
    key_file = privacy_dir / "keys.json"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_forget_tenant_deletes_its_conversations(
    privacy: privacy_pb2_grpc.PrivacyServiceStub, tmp_path: Path
) -> None:
    redact(privacy, "Zoë Martin", tenant="initech", conversation="forget-me")
    reply = privacy.ForgetTenant(
        privacy_pb2.PrivacyServiceForgetTenantRequest(tenant="initech"), timeout=30
    )
    assert reply.deleted == 1
    gone = refused(
        privacy.Restore,
        privacy_pb2.PrivacyServiceRestoreRequest(
            text="<PERSON_1>", tenant="initech", conversation_id="forget-me"
        ),
    )
    assert gone.code() == grpc.StatusCode.NOT_FOUND


def test_forget_subject_deletes_the_conversations_that_held_it(
    privacy: privacy_pb2_grpc.PrivacyServiceStub,
) -> None:
    held = redact(
        privacy, "Write to zoe.subject@example.com today", tenant="hooli", conversation="held"
    )
    redact(privacy, "Write to max.other@example.com today", tenant="hooli", conversation="other")
    redact(privacy, "Write to zoe.subject@example.com", tenant="initech", conversation="theirs")
    assert held.subject_index  # the blind index the kernel stores with the task
    assert all(b"zoe" not in token for token in held.subject_index)

    reply = privacy.ForgetSubject(
        privacy_pb2.PrivacyServiceForgetSubjectRequest(
            tenant="hooli", subject=" ZOE.subject@Example.com", conversation_ids=["theirs"]
        ),
        timeout=30,
    )

    assert (reply.deleted, list(reply.conversation_ids)) == (1, ["held"])
    assert set(held.subject_index) <= set(reply.subject_index)
    gone = refused(
        privacy.Restore,
        privacy_pb2.PrivacyServiceRestoreRequest(
            text="<EMAIL_ADDRESS_1>", tenant="hooli", conversation_id="held"
        ),
    )
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    # Another conversation of the tenant, and another tenant's (named, but not theirs), stay.
    assert restore(privacy, "<EMAIL_ADDRESS_1>", "hooli", "other") == "max.other@example.com"
    assert restore(privacy, "<EMAIL_ADDRESS_1>", "initech", "theirs") == "zoe.subject@example.com"
    again = privacy.ForgetSubject(
        privacy_pb2.PrivacyServiceForgetSubjectRequest(
            tenant="hooli", subject="zoe.subject@example.com"
        ),
        timeout=30,
    )
    assert (again.deleted, list(again.conversation_ids)) == (0, [])
    empty = refused(
        privacy.ForgetSubject,
        privacy_pb2.PrivacyServiceForgetSubjectRequest(tenant="hooli", subject="  "),
    )
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "subject is empty" in (empty.details() or "")


async def test_the_kernel_redacts_a_chat_and_restores_its_stream(served: Served) -> None:
    """kernel/privacy.py against the real service: each message redacted in one
    conversation, the trace evidence holds types and counts only, and a stream cut inside
    placeholders comes back whole."""
    from llmos.kernel.privacy import OutputRestorer, redact_request
    from llmos.v1 import common_pb2, kernel_pb2

    request = kernel_pb2.GenerateRequest(
        messages=[
            common_pb2.ChatMessage(role="user", content="I'm Zoë Martin, mail zoe@example.org."),
            common_pb2.ChatMessage(role="assistant", content=""),
            common_pb2.ChatMessage(role="user", content="Remind Zoë Martin about Lisbon."),
        ]
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port + PRIVACY_OFFSET}") as channel:
        redaction = await redact_request(
            channel, request, tenant="acme", conversation="task-1", mode="pseudonymize", timeout=30
        )
        contents = [m.content for m in redaction.request.messages]
        assert contents == [
            "I'm <PERSON_1>, mail <EMAIL_ADDRESS_1>.",
            "",
            "Remind <PERSON_1> about <LOCATION_1>.",
        ]
        assert request.messages[0].content.startswith("I'm Zoë")  # the original is untouched
        evidence = redaction.evidence()
        assert evidence == {
            "operator": "pseudonymize",
            "entities": "EMAIL_ADDRESS:1,LOCATION:1,PERSON:2",
            "entity_count": "4",
        }
        assert "Zoë" not in str(evidence) and redaction.restorable

        restorer = OutputRestorer(channel, tenant="acme", conversation="task-1")
        pieces = ["Sure, <PER", "SON_1> will", " fly to <LOC", "ATION_1", ">", " soon <"]
        shown = [await restorer.feed(piece) for piece in pieces]
        shown.append(await restorer.close())
        assert "".join(shown) == "Sure, Zoë Martin will fly to Lisbon soon <"
        assert shown[0] == "Sure, "

        masked = await redact_request(
            channel, request, tenant="acme", conversation="task-2", mode="mask", timeout=30
        )
        assert masked.request.messages[0].content == "I'm **********, mail ***************."
        assert not masked.restorable


def test_cli_scan_and_eval_go_through_the_running_service(served: Served, tmp_path: Path) -> None:
    import json

    done = served.stack.llmos("privacy", "scan", "Call Zoë Martin on +1 212-555-0187.")
    assert done.returncode == 0, done.stderr
    entities = json.loads(done.stdout)
    assert [(e["type"], e["start"], e["end"]) for e in entities] == [
        ("PERSON", 5, 15),
        ("PHONE_NUMBER", 19, 34),
    ]
    assert all(0 < e["score"] <= 1 and e["recognizer"] for e in entities)

    labelled = tmp_path / "set.jsonl"

    def row(text: str, *spans: tuple[str, int, int]) -> dict[str, object]:
        return {"text": text, "entities": [{"type": t, "start": a, "end": b} for t, a, b in spans]}

    rows = [
        row("Mail zoe@example.org today.", ("EMAIL_ADDRESS", 5, 20)),
        row("Omar Haddad lives in Lisbon.", ("PERSON", 0, 11), ("LOCATION", 21, 27)),
        row("Nothing personal here."),
    ]
    labelled.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    done = served.stack.llmos("privacy", "eval", str(labelled), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["messages"] == 3 and report["labelled"] == 3
    assert report["entities"]["ALL"]["f2"] == 1.0 and report["leak_rate"] == 0.0
    assert report["messages_per_s"] > 0

    table = served.stack.llmos("privacy", "eval", str(labelled))
    assert table.returncode == 0 and "leak rate 0.00%" in table.stdout

    labelled.write_text('{"text": "x", "entities": [{"type": "PERSON", "start": 0, "end": 9}]}\n')
    bad = served.stack.llmos("privacy", "eval", str(labelled))
    assert bad.returncode == 2 and "outside the text" in bad.stderr
