"""The safety service: harmful-content and jailbreak detection on prompts and streamed outputs.

    taxonomy.py   Llama Guard 3's S1-S14, jailbreak, prompt injection; OpenAI moderation names
    normalise.py  the views of a text (NFKC, confusables, zero-width, leetspeak, base64, rot13)
    rules.py      markers, deny and allow phrases, read on every view
    encoder.py    all-MiniLM-L6-v2 as int8 ONNX: its tokenizer, and vectors from token ids
    head.py       the trained classifier head (numpy), and its training
    judge.py      views cut into token windows; rules + classifier + policy -> the verdict
    policy.py     per-tenant thresholds and actions, versioned, saved
    stream.py     windows of a streamed output
    checks.py     bad input, refused before any work
    evaluation.py precision, recall, F1, FPR, recall at 1% FPR
    server.py     the gRPC service

docs/safety.md explains how they fit and what was measured.
"""
