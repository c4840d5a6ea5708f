"""Prefect flows: orchestration only; the stages live in tasks/stages/ and DVC decides what is stale."""
