"""Prefect flows: orchestration only; the stages live in tasks/ and DVC decides what is stale."""
