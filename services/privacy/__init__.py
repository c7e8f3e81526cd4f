"""The privacy service: finds PII, redacts it reversibly before the model, restores it for
the user (docs/privacy.md).

    server.py       PrivacyService over gRPC: Detect, Redact, Restore, RestoreStream,
                    ForgetSubject, ForgetTenant
    recognizers.py  pattern recognizers with checksums, capitalised runs, spaCy NER, and
                    the overlap rule that keeps redaction reversible (pure but for spaCy)
    operators.py    mask, replace, hash, encrypt, pseudonymize; restore; StreamRestorer
    vault.py        placeholders and their values per tenant and conversation, AES-GCM
    subjects.py     blind index of data subjects (keyed HMAC of normalised values)
    keys.py         key ring from a 0600 key file or the environment; per-tenant HKDF keys
    checks.py       request checks (pure)
    dataset.py      the synthetic labelled set, split by template (Faker)
    evaluation.py   span P/R/F2 per type and leak rate (pure)
"""
