"""The domain contract and shared helpers every domain module builds on."""
