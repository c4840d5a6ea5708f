"""Pipeline stages: plain functions taking a domain name and paths, called by the CLI."""
